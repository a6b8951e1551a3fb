"""`Pipeline`: the one base class of the task pipelines.

It does everything the tasks share: loading and placing the model (`pipelines.loading`), turning the
calling shapes users know from transformers into a list of input records, checking settings, batching,
and running

    preprocess(record)  -> {"conversation": [...], "images": [...], "videos": [...]}     (one input)
    forward(prepared)   -> FusionModel.chat(...) outputs {"text", "tokens", "logprob"}    (one batch)
    postprocess(output) -> the task's result list, e.g. [{"answer": ..., "score": ...}]  (one input)

A task subclass declares its input fields, its default `max_new_tokens` and any extra settings, and
writes `preprocess` and `postprocess` (and, where its fields need more than a presence check,
`check_input`).

Calling shapes (fields named for VQA; captioning has only `image`, video QA `video` and `question`):

    pipe(image=..., question=...) / pipe(image, question)   one input  -> one result list
    pipe({"image": ..., "question": ...})                    one input  -> one result list
    pipe([{"image": ..., "question": ...}, ...])             a list     -> a list of result lists
    pipe(image=[im1, im2], question="...")                   a list field makes a list: every image with
                                                             every question (image-major), as transformers does

Settings come from three places, later wins: the class defaults, the construction call
(`pipeline(..., max_new_tokens=8, generate_kwargs={...})`), the call itself (`pipe(..., max_new_tokens=4)`).
"""
from __future__ import annotations

import inspect
import itertools
import operator
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fusion.generation import generate as _generate_tokens
from fusion.model import eval_mode
from vision import load_image

from .errors import PipelineInputError
from .loading import load_model, resolve_device, resolve_dtype

# Options of `fusion.generation.generate` the pipeline sets itself (or that make no sense to change).
_OWNED_GENERATION_OPTIONS = {"decoder", "input_ids", "inputs_embeds", "attention_mask", "return_logprobs", "pad_id"}
#: What `generate_kwargs` may hold: the options of `fusion.generation.generate`, e.g. do_sample,
#: temperature, top_k, top_p, stop_ids, generator, max_new_tokens.
GENERATION_OPTIONS = frozenset(inspect.signature(_generate_tokens).parameters) - _OWNED_GENERATION_OPTIONS


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise PipelineInputError(f"{name} must be a positive int, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise PipelineInputError(f"{name} must be a positive int, got a {type(value).__name__}") from None
    if number < 1:
        raise PipelineInputError(f"{name} must be at least 1, got {number}")
    return number


def merge_generation(settings: dict, max_new_tokens, generate_kwargs, where: str) -> dict:
    """`settings` updated with `generate_kwargs`, then with `max_new_tokens` (each where given), checked."""
    merged = dict(settings)
    if generate_kwargs is not None:
        if not isinstance(generate_kwargs, Mapping):
            raise PipelineInputError(f"{where}: generate_kwargs must be a dict, got a {type(generate_kwargs).__name__}")
        unknown = sorted(set(generate_kwargs) - GENERATION_OPTIONS)
        if unknown:
            raise TypeError(f"{where}: generate_kwargs has unsupported option(s) {', '.join(map(repr, unknown))}; "
                            f"the pipeline passes on {', '.join(sorted(GENERATION_OPTIONS))}")
        merged.update(generate_kwargs)
    if max_new_tokens is not None:
        merged["max_new_tokens"] = max_new_tokens
    merged["max_new_tokens"] = check_positive_int(merged["max_new_tokens"], f"{where}: max_new_tokens")
    return merged


class Pipeline:
    """Base class of the task pipelines (see the module docstring for the calling shapes).

    Args:
        model: a checkpoint folder (str or os.PathLike), a `FusionModel`, or None for the default model. The
            model answers in eval mode; a given model's train/eval modes are restored after each call.
        device: -1 / "cpu" / 0 / "cuda:1" / torch.device; None keeps a given model where it is.
        dtype: a torch dtype or its name ("float32", "bfloat16"); None keeps a given model's (a model loaded
            from a folder is in float32, whatever the file stores).
        batch_size: how many inputs go through the model together (greedy results do not depend on it;
            sampled ones do, as the rows of a batch share one random stream).
        max_new_tokens: the most tokens generated per input (default: the task's `default_max_new_tokens`).
        generate_kwargs: options of `fusion.generation.generate` (do_sample, temperature, top_k, top_p,
            stop_ids, generator).
        **options: the task's own settings (see its `task_options`).
    """

    task: ClassVar[str] = ""
    #: the input fields, in positional order; every one is required
    input_fields: ClassVar[tuple[str, ...]] = ()
    default_max_new_tokens: ClassVar[int] = 32
    #: the task's extra settings (construction and call time) and their defaults
    task_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, model=None, *, device=None, dtype=None, batch_size: int = 1, max_new_tokens: int | None = None,
                 generate_kwargs: dict | None = None, **options):
        where = f"pipeline({self.task!r})"
        self._check_option_names(options, where, construction=True)
        self.batch_size = check_positive_int(batch_size, f"{where}: batch_size")
        self.generation = merge_generation({"max_new_tokens": self.default_max_new_tokens}, max_new_tokens,
                                           generate_kwargs, where)
        self.options = self.merge_options(dict(self.task_options), options, where)
        self.model = load_model(model, resolve_device(device), resolve_dtype(dtype))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.decoder.embed_tokens.weight.dtype

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"batch_size={self.batch_size}, max_new_tokens={self.generation['max_new_tokens']})")

    # -- what a task says ------------------------------------------------------------------------
    def check_input(self, record: dict, where: str) -> dict:
        """Check one input record (its fields are all present) before any model work; return it cleaned."""
        return record

    def merge_options(self, options: dict, updates: dict, where: str) -> dict:
        """`options` with the non-None `updates` applied (a task may check or combine them)."""
        return {**options, **{k: v for k, v in updates.items() if v is not None}}

    def preprocess(self, record: dict, **options) -> dict:
        """One input record -> {"conversation": [...], "images": [...], "videos": [...]} for `FusionModel.chat`."""
        raise NotImplementedError

    def load_image(self, image):
        """`vision.load_image` under the model's own pixel limit (its processor's `max_pixels`, as `chat` and
        training apply it)."""
        return load_image(image, max_pixels=self.model.processor.image_processor.max_pixels)

    def postprocess(self, output: dict) -> list[dict]:
        """One `FusionModel.chat` output {"text", "tokens", "logprob"} -> the task's result list."""
        raise NotImplementedError

    # -- the shared run --------------------------------------------------------------------------
    def forward(self, prepared: list[dict], **generation) -> list[dict]:
        """Generate for one batch of preprocessed inputs (greedy unless generate_kwargs say otherwise)."""
        return self.model.chat([p["conversation"] for p in prepared], images=[p.get("images", ()) for p in prepared],
                               videos=[p.get("videos", ()) for p in prepared], **generation)

    def __call__(self, *inputs, batch_size: int | None = None, max_new_tokens: int | None = None,
                 generate_kwargs: dict | None = None, **kwargs):
        """Run the pipeline: one input gives one result list, a list of inputs a list of result lists."""
        where = f"{self.task} pipeline call"
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in self.input_fields}
        self._check_option_names(kwargs, where, construction=False)
        size = self.batch_size if batch_size is None else check_positive_int(batch_size, f"{where}: batch_size")
        generation = merge_generation(self.generation, max_new_tokens, generate_kwargs, where)
        options = self.merge_options(self.options, kwargs, where)
        records, is_list = self._records(inputs, fields, where)

        results = []
        with eval_mode(self.model):
            for start in range(0, len(records), size):
                prepared = []
                for index in range(start, min(start + size, len(records))):
                    try:
                        prepared.append(self.preprocess(records[index], **options))
                    except Exception as err:
                        if is_list and hasattr(err, "add_note"):  # Python >= 3.11
                            err.add_note(f"(raised for input {index} of the {len(records)} given to the {self.task} "
                                         f"pipeline)")
                        raise
                results.extend(self.postprocess(output) for output in self.forward(prepared, **generation))
        return results if is_list else results[0]

    # -- argument normalisation ------------------------------------------------------------------
    def _usage(self) -> str:
        named = ", ".join(f"{f}=..." for f in self.input_fields)
        record = ", ".join(f"{f!r}: ..." for f in self.input_fields)
        return f"pipe({named}), pipe({{{record}}}) or pipe([{{{record}}}, ...])"

    def _check_option_names(self, options: dict, where: str, construction: bool) -> None:
        unknown = sorted(set(options) - set(self.task_options))
        if unknown:
            accepted = ["max_new_tokens", "generate_kwargs", *self.task_options]
            if construction:
                accepted = ["device", "dtype", "batch_size", *accepted]
            else:
                accepted = [*self.input_fields, "batch_size", *accepted]
            hint = ("; for questions about a video, use fusion.pipeline('video-qa')"
                    if {"video", "videos"} & set(unknown) and "video" not in self.input_fields else "")
            raise TypeError(f"{where}: unexpected argument(s) {', '.join(map(repr, unknown))}; "
                            f"it takes {', '.join(accepted)}{hint}")

    def _records(self, inputs: tuple, fields: dict, where: str) -> tuple[list[dict], bool]:
        """The call's inputs as a list of records {field: value}, and whether the call gave a list."""
        if len(inputs) > len(self.input_fields):
            raise TypeError(f"{where}: takes at most {len(self.input_fields)} positional input(s) "
                            f"({', '.join(self.input_fields)}), got {len(inputs)}; call it as {self._usage()}")
        first = inputs[0] if inputs else None
        if isinstance(first, (list, tuple)) and not first and len(inputs) == 1 and not fields:
            return [], True  # an empty list (or tuple) of records
        if isinstance(first, Mapping) or (isinstance(first, (list, tuple)) and first
                                          and all(isinstance(r, Mapping) for r in first)):
            if len(inputs) > 1 or fields:
                raise PipelineInputError(f"{where}: give input records (dicts) alone, or the fields "
                                         f"{', '.join(self.input_fields)} as arguments, not both")
            is_list = isinstance(first, (list, tuple))  # a list or tuple of records
            raw = list(first) if is_list else [first]
            return [self._check_record(r, i if is_list else None, where) for i, r in enumerate(raw)], is_list

        given = dict(zip(self.input_fields, inputs))
        for name, value in fields.items():
            if name in given:
                raise TypeError(f"{where}: got {name!r} both as a positional input and as a keyword")
            given[name] = value
        if not given:
            raise PipelineInputError(f"{where}: no input given; call it as {self._usage()}")
        missing = [f for f in self.input_fields if f not in given]
        if missing:
            raise PipelineInputError(f"{where}: missing {', '.join(map(repr, missing))}; call it as {self._usage()}")
        values = [given[f] if isinstance(given[f], list) else [given[f]] for f in self.input_fields]
        is_list = any(isinstance(given[f], list) for f in self.input_fields)
        records = [dict(zip(self.input_fields, combo)) for combo in itertools.product(*values)]
        return [self.check_input(r, where if not is_list else f"{where}, input {i}")
                for i, r in enumerate(records)], is_list

    def _check_record(self, record: Mapping, index: int | None, where: str) -> dict:
        if index is not None:
            where = f"{where}, input {index}"
        if not isinstance(record, Mapping):
            raise PipelineInputError(f"{where}: expected a dict with keys {', '.join(map(repr, self.input_fields))}, "
                                     f"got a {type(record).__name__}")
        missing = [f for f in self.input_fields if f not in record]
        unknown = sorted(str(k) for k in record if k not in self.input_fields)
        if missing or unknown:
            problems = ([f"missing key(s) {', '.join(map(repr, missing))}"] if missing else []) + \
                       ([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else [])
            raise PipelineInputError(f"{where}: the input record has {' and '.join(problems)}; a {self.task} input is "
                                     f"a dict with exactly the keys {', '.join(map(repr, self.input_fields))}")
        return self.check_input(dict(record), where)
