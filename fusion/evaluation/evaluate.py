"""Evaluate a fusion model on a dataset file (JSONL or LLaVA JSON, see `fusion.data.datasets`).

Each sample's conversation, up to (not including) its last assistant turn, is answered greedily by
`model.chat`; the answer is compared with that last assistant turn:

- "vqa", "video-qa", "text" (and any other task name, with a warning): normalised exact match
  (`fusion.evaluation.metrics.answer_is_correct`), overall and per question type.
- "caption" (or "captioning", the pipelines' name): corpus BLEU-4 and CIDEr-D. One caption is generated
  per image (or video), and its references are all the captions the file has for that image; "count" is
  the number of images captioned, "samples" the number of caption samples.

Task names are read in any case ("VQA" is "vqa"); a sample with no "task" gets one inferred
(`fusion.data.datasets.infer_task`). Bad samples (a malformed line, a missing image, a reference that is not
text, ...) are skipped and counted per reason, as by the dataset; an evaluation where most samples are bad
stops with `DatasetError`: once `min_attempts` samples were tried and more than `max_bad_fraction` of them were
bad, and at the end when none could be evaluated, or more than `max_bad_fraction` of at least
`min(min_attempts, 5)` samples were bad.

    results = evaluate(model, "data/test.jsonl", limit=500)
    results["tasks"]["vqa"]["accuracy"], results["tasks"]["vqa"]["by_type"]["color"]
    results["tasks"]["caption"]["bleu4"], results["tasks"]["caption"]["cider"]
    results["counts"]["skipped_by_reason"]

Command line (wired as `fusion eval`): ``fusion eval MODEL_DIR DATA.jsonl [--root R] [--out results.json]
[--batch-size N] [--limit N] [--max-new-tokens N]
[--device cpu|cuda|cuda:N]``. `~` in the paths is a home folder; `--out` is checked (a file path in a
folder that can be written) before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from tokenizer.errors import NoSupervisedTokensError, TokenizerError
from vision.errors import VisionInputError

from ..checkpoint import model_folder, user_path, write_json
from ..cli import whole_number
from ..data.datasets import (MISSING_IMAGE, MISSING_VIDEO, TASKS, ConversationDataset, DatasetWarning, Record,
                             classify_error)
from ..errors import CheckpointError, ConfigError, DatasetError
from ..model import eval_mode
from .metrics import accuracy_by_type, answer_is_correct, bleu4, cider_d

__all__ = ["evaluate", "add_eval_arguments", "run_eval", "format_results"]

CAPTION = "caption"
TASK_ALIASES = {"captioning": CAPTION}  # the pipelines' name for it (`pipelines.pipeline("captioning")`)
# at the end of an evaluation, the fewest samples tried for "most were bad" to stop it (none evaluated always does)
FEW_ATTEMPTS = 5
MAX_WARNINGS = 20  # bad samples warned about one by one (all are counted, and listed in the results)
# errors that make one sample unusable (its media or its conversation); anything else is a bug and raises
_SAMPLE_ERRORS = (VisionInputError, TokenizerError, OSError)


@dataclass
class _Item:
    """One generation: a record, or for captions every record of one image (the first one's prompt)."""

    index: int  # position of its first record, to report predictions in file order
    task: str
    records: list[Record]
    references: list[str] = field(default_factory=list)
    prediction: str | None = None

    @property
    def first(self) -> Record:
        return self.records[0]


def _caption_key(record: Record):
    """Captions of the same media asked the same way are one generation scored against all of them as
    references (COCO's five captions of an image); another request about the same image is its own."""
    return (tuple(record.images), tuple(record.videos), json.dumps(record.prompt, sort_keys=True))


def task_name(record: Record) -> str:
    """The record's task (given or inferred) as evaluation reads it: in lower case, "captioning" is "caption"."""
    task = str(record.inferred_task).strip().lower()
    return TASK_ALIASES.get(task, task)


def _warn_unknown_tasks(path: str, items: list[_Item]) -> None:
    """One warning per task name that is not one of `TASKS`: such samples are scored by exact match."""
    counts: Counter = Counter()
    for it in items:
        if it.task not in TASKS:
            counts[it.task] += len(it.records)
    for task, count in sorted(counts.items()):
        warnings.warn(f"{path}: task {task!r} ({count} sample{'s' if count != 1 else ''}) is not one of "
                      f"{', '.join(TASKS)} (or {', '.join(TASK_ALIASES)}): scored by normalised exact match, as "
                      f"vqa is; name the task in the file if it should be scored otherwise", DatasetWarning,
                      stacklevel=3)


def _items(records: list[Record]) -> list[_Item]:
    items: list[_Item] = []
    captions: dict[tuple, _Item] = {}
    for index, record in enumerate(records):
        task = task_name(record)
        if task == CAPTION:
            key = _caption_key(record)
            if key in captions:
                captions[key].records.append(record)
                captions[key].references.append(record.answer)
                continue
            item = captions[key] = _Item(index, task, [record], [record.answer])
        else:
            item = _Item(index, task, [record], [record.answer])
        items.append(item)
    return items


def _default_max_new_tokens(lengths: list[int]) -> int:
    """Room for the longest reference of a task (all its references, so that the batch size changes
    nothing), plus 8 tokens; at least 16. `lengths`: the task's references in tokens."""
    return max(16, max(lengths) + 8)


def evaluate(model, dataset_path, *, root=None, batch_size: int = 16, max_new_tokens: int | None = None,
             limit: int | None = None, progress: bool = True, return_predictions: bool = False,
             num_frames: int | None = None, fps: float | None = None, min_attempts: int = 20,
             max_bad_fraction: float = 0.5, processes=None) -> dict:
    """Greedy answers of `model` on the samples of `dataset_path`, scored per task (see the module docstring).

    Args:
        model: a `fusion.FusionModel` (put in eval mode for the run, its modes restored afterwards).
        dataset_path: a JSONL or LLaVA JSON file; media paths relative to `root` (default: its folder). `~`
            in either is a home folder.
        batch_size: conversations per `model.chat` call (samples of one task per batch).
        max_new_tokens: the generation limit; None: per task, its longest reference in tokens + 8 (>= 16;
            the limits used are in `settings["max_new_tokens_by_task"]`).
        limit: evaluate only the first `limit` usable samples of the file.
        return_predictions: add `"predictions"`: one entry per generation, in file order.
        num_frames, fps: video frame sampling (None: the model's settings).
        min_attempts, max_bad_fraction: when bad samples stop the evaluation with `DatasetError` (see the
            module docstring).
        processes: a `fusion.distributed.DistContext` when the processes of a torchrun evaluate one
            FSDP2-sharded model together (every process calls `evaluate` with the same arguments; the model's
            root module unsharded first): each batch of `batch_size` per process is shared among them, each
            answers its share, and they generate in step (one generation per batch each, stopped together).
            Every process returns the results of all; the main process (rank 0) warns about every bad sample.
            None: this process evaluates alone.

    Returns a JSON-serialisable dict: `tasks` (per task: count, accuracy, correct, by_type, count_by_type;
    for "caption": count, samples, bleu4, cider), `counts` (records, evaluated, skipped, skipped_by_reason,
    by_task), `skipped_samples` (id, line, reason and message of each sample left out), `settings`, `time_s`
    and, when asked, `predictions`.
    """
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"evaluate: limit must be >= 0 or None, got {limit}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"evaluate: max_new_tokens must be >= 1 (None: from the references), got {max_new_tokens}")
    start = time.perf_counter()
    dataset = ConversationDataset(user_path(dataset_path), model.processor,
                                  root=None if root is None else user_path(root), min_attempts=min_attempts,
                                  max_bad_fraction=max_bad_fraction)
    records = dataset.records if limit is None else dataset.records[:limit]
    # the lines that could not be read, within the part of the file considered (all of it without a limit)
    last_line = records[-1].line if limit is not None and records else None
    skipped_samples = [{"id": sample_id, "line": line, "reason": reason, "message": message}
                       for line, reason, message, sample_id in dataset.bad_at_load
                       if last_line is None or line <= last_line]
    attempted = bad = warned = 0
    in_step = processes is not None and processes.distributed
    # in step: the samples this process found bad while answering its shares, and their warnings (before that,
    # every process finds the same ones)
    shared_skips: list[dict] = []
    shared_warnings: list[str] = []
    answering = False

    def warn(message: str, stacklevel: int):
        nonlocal warned
        if in_step and not processes.is_main:  # said once, by the main process
            return
        warned += 1
        if warned <= MAX_WARNINGS:
            warnings.warn(message, DatasetWarning, stacklevel=stacklevel + 1)

    def skip(item: _Item, error: BaseException):
        nonlocal bad
        reason = classify_error(error, item.first)
        entries = [{"id": r.id, "line": r.line, "reason": reason, "message": str(error)} for r in item.records]
        where = dataset.where(item.first.line)
        message = f"{dataset.path}: skipped sample {item.first.id!r} ({where}): {reason}: {error}"
        bad += 1
        if in_step and answering:  # the main process says the others' too (`merge_shares`)
            shared_skips.extend(entries)
            shared_warnings.append(message)
        else:
            skipped_samples.extend(entries)
        warn(message, stacklevel=3)

    def merge_shares() -> list[dict]:
        """`skipped_samples` with every process's `shared_skips`; the main process warns about the others'."""
        merged = list(skipped_samples)
        for rank, (skips, messages) in enumerate(processes.all_gather_objects((shared_skips, shared_warnings))):
            merged += skips
            if rank != processes.rank:
                for message in messages:
                    warn(message, stacklevel=2)
        return merged

    # every reference in tokens, before any generation (for the default limits, and whatever the limit: a
    # reference that is not text, e.g. one holding a lone surrogate, makes its sample bad, not the evaluation)
    tokenizer = model.processor.tokenizer
    usable, lengths = [], defaultdict(list)
    for index, record in enumerate(records):
        try:
            if not record.answer.strip():  # nothing to score against (training skips such a sample too)
                raise NoSupervisedTokensError("the answer is empty or whitespace only: there is no reference to "
                                              "score the prediction against; give the record its answer")
            length = len(tokenizer.encode(record.answer))
        except TokenizerError as err:
            skip(_Item(index, task_name(record), [record]), err)
            attempted += 1
            continue
        usable.append(record)
        lengths[task_name(record)].append(length)
    items = _items(usable)
    _warn_unknown_tasks(dataset.path, items)

    per_task: dict[str, list[_Item]] = defaultdict(list)
    for it in items:
        per_task[it.task].append(it)
    # one task per batch: similar prompts and answer lengths (in step: a batch for all processes together)
    size = batch_size * (processes.world_size if in_step else 1)
    batches = [group[b:b + size] for group in per_task.values() for b in range(0, len(group), size)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="eval", unit="sample", file=sys.stderr, disable=not progress)
    limits = {task: max_new_tokens if max_new_tokens is not None else _default_max_new_tokens(lengths[task])
              for task in per_task}
    bad_before_answers = bad
    answering = True
    try:
        with eval_mode(model):
            for batch in batches:
                if in_step:
                    _answer_in_step(model, batch, limits[batch[0].task], num_frames, fps, skip, processes)
                else:
                    _answer(model, batch, limits[batch[0].task], num_frames, fps, skip)
                attempted += len(batch)
                bar.update(len(batch))
                bad_so_far = bad if not in_step else \
                    bad_before_answers + int(processes.all_reduce_sum(torch.tensor([bad - bad_before_answers]))[0])
                if attempted >= min_attempts and bad_so_far > max_bad_fraction * attempted:
                    if in_step:
                        skipped_samples = merge_shares()
                    raise _mostly_bad(dataset, f"{bad_so_far} of the {attempted} samples evaluated so far were bad",
                                      skipped_samples)
    finally:
        bar.close()
    if in_step:  # each process's answers and bad samples, on every process
        skipped_samples = merge_shares()
        answers = {}
        for part in processes.all_gather_objects({it.index: it.prediction for it in items
                                                  if it.prediction is not None}):
            answers.update(part)
        for it in items:
            it.prediction = answers.get(it.index)

    done = [it for it in items if it.prediction is not None]
    skipped = Counter(entry["reason"] for entry in skipped_samples)
    # the whole (considered) file was tried: its records, and the lines within it that could not be read
    evaluated = sum(len(it.records) for it in done)
    tried = evaluated + len(skipped_samples)
    if tried and not evaluated:
        raise _mostly_bad(dataset, f"none of the {tried} samples could be evaluated", skipped_samples)
    if tried >= min(min_attempts, FEW_ATTEMPTS) and len(skipped_samples) > max_bad_fraction * tried:
        raise _mostly_bad(dataset, f"{len(skipped_samples)} of the {tried} samples were bad", skipped_samples)
    results = {"dataset": dataset.path, "format": dataset.format, "tasks": _scores(done),
               "counts": {"records": len(dataset.source_records) + dataset.num_bad_at_load,
                          "considered": len(records),
                          "evaluated": evaluated,
                          "skipped": sum(skipped.values()),
                          "skipped_by_reason": dict(skipped.most_common()),
                          "by_task": dict(sorted(Counter(it.task for it in done for _ in it.records).items()))},
               "skipped_samples": sorted(skipped_samples, key=lambda entry: entry["line"]),
               "settings": {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
                            "max_new_tokens_by_task": dict(sorted(limits.items())), "limit": limit,
                            "num_frames": num_frames, "fps": fps},
               "time_s": round(time.perf_counter() - start, 3)}
    if return_predictions:
        results["predictions"] = [_prediction(it) for it in sorted(done, key=lambda it: it.index)]
    return results


def _mostly_bad(dataset: ConversationDataset, what: str, skipped_samples: list[dict]) -> DatasetError:
    """The `DatasetError` of an evaluation that stops on its bad samples: what, their commonest reasons and,
    when missing media lead, the root that media paths were read from."""
    reasons = Counter(entry["reason"] for entry in skipped_samples)
    hint = ""
    if reasons.most_common(1)[0][0] in (MISSING_IMAGE, MISSING_VIDEO):
        hint = f"; media paths are read relative to root={dataset.root!r}: is that the right folder?"
    common = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common(3))
    return DatasetError(f"{dataset.path}: {what} (most common: {common}){hint}")


def _chat(model, items: list[_Item], limit: int, num_frames, fps, **kwargs) -> None:
    """Fill `prediction` for `items` with one greedy `model.chat` (`kwargs`: more of its options); raises what
    reading a sample raises (in the processor, before any forward)."""
    outputs = model.chat([it.first.prompt for it in items], [it.first.images for it in items],
                         [it.first.videos for it in items], max_new_tokens=limit, num_frames=num_frames, fps=fps,
                         do_sample=False, **kwargs)
    for it, out in zip(items, outputs):
        it.prediction = out["text"]


def _answer(model, batch: list[_Item], limit: int, num_frames, fps, skip) -> None:
    """Fill `prediction` for the items of `batch`; on a bad sample, retry one by one to find and skip it."""
    try:
        return _chat(model, batch, limit, num_frames, fps)
    except _SAMPLE_ERRORS:
        pass
    for it in batch:
        try:
            _chat(model, [it], limit, num_frames, fps)
        except _SAMPLE_ERRORS as err:
            skip(it, err)


def _answer_in_step(model, batch: list[_Item], limit: int, num_frames, fps, skip, processes) -> None:
    """Fill `prediction` for this process's share of `batch` (every `world_size`-th item from its rank on),
    with exactly one generation, stopped when every process's is (`stop_together`): the items that can be
    read together; if one cannot, each is read alone first (the processor only, no forward) and the readable
    ones answered together; with none (or no share), a stand-in question without media, its answer dropped."""
    share = batch[processes.rank::processes.world_size]
    together = {"stop_together": processes.all_done}
    if share:
        try:
            return _chat(model, share, limit, num_frames, fps, **together)
        except _SAMPLE_ERRORS:
            pass
    readable = []
    for it in share:
        try:
            model.processor(it.first.prompt, it.first.images, it.first.videos, add_generation_prompt=True,
                            num_frames=num_frames, fps=fps)
            readable.append(it)
        except _SAMPLE_ERRORS as err:
            skip(it, err)
    if readable:
        _chat(model, readable, limit, num_frames, fps, **together)
    else:
        model.chat([[{"role": "user", "content": "?"}]], max_new_tokens=limit, do_sample=False, **together)


def _scores(items: list[_Item]) -> dict:
    by_task: dict[str, list[_Item]] = defaultdict(list)
    for it in items:
        by_task[it.task].append(it)
    scores = {}
    for task in sorted(by_task):
        group = by_task[task]
        predictions = [it.prediction for it in group]
        references = [it.references for it in group]
        if task == CAPTION:
            scores[task] = {"count": len(group), "samples": sum(len(it.records) for it in group),
                            "bleu4": bleu4(predictions, references), "cider": cider_d(predictions, references)}
            continue
        types = [it.first.type or "unknown" for it in group]
        correct = sum(answer_is_correct(p, r) for p, r in zip(predictions, references))
        scores[task] = {"count": len(group), "correct": correct, "accuracy": correct / len(group),
                        "by_type": accuracy_by_type(predictions, references, types),
                        "count_by_type": dict(sorted(Counter(types).items()))}
    return scores


def _prediction(item: _Item) -> dict:
    entry = {"id": item.first.id, "task": item.task, "type": item.first.type, "prediction": item.prediction,
             "references": item.references, "images": item.first.images, "videos": item.first.videos}
    if item.task == CAPTION:
        entry["ids"] = [r.id for r in item.records]
    else:
        entry["correct"] = answer_is_correct(item.prediction, item.references)
    return entry


# ---------------------------------------------------------------------------------------------------
# Command line


def format_results(results: dict) -> str:
    """A short plain-text table of `evaluate` results."""
    lines = [f"{'task':<10} {'count':>7}  metrics"]
    for task, r in results["tasks"].items():
        if task == CAPTION:
            metrics = f"bleu4 {r['bleu4']:.4f}  cider {r['cider']:.4f}  ({r['samples']} captions)"
        else:
            per_type = ", ".join(f"{t} {v:.3f}" for t, v in r["by_type"].items())
            metrics = f"accuracy {r['accuracy']:.4f}  ({per_type})"
        lines.append(f"{task:<10} {r['count']:>7}  {metrics}")
    counts = results["counts"]
    if counts["skipped"]:
        reasons = ", ".join(f"{k} x{v}" for k, v in counts["skipped_by_reason"].items())
        lines.append(f"skipped {counts['skipped']}: {reasons}")
    lines.append(f"evaluated {counts['evaluated']} of {counts['records']} records in {results['time_s']:.1f} s")
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `fusion eval MODEL_DIR DATA [options]`."""
    parser.add_argument("model", help="a model folder (written by save_pretrained or by training), or `default` for "
                                      "the model that ships with fusion (a folder called so: ./default)")
    parser.add_argument("data", help="the dataset file: JSONL or LLaVA-style JSON")
    parser.add_argument("--root", default=None, help="folder that media paths are relative to (default: the data "
                                                     "file's folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file (a file path, not a "
                                                    "folder)")
    parser.add_argument("--batch-size", type=whole_number(1), default=16, help="conversations per generation batch (default 16)")
    parser.add_argument("--limit", type=whole_number(0), default=None, help="evaluate only the first N samples")
    parser.add_argument("--max-new-tokens", type=whole_number(1), default=None,
                        help="generation limit (default: per task, the longest reference answer or caption of the "
                             "file + 8 tokens, at least 16)")
    parser.add_argument("--num-frames", type=whole_number(1), default=None, help="frames per video (default: the model's)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--predictions", action="store_true", help="include every prediction in the JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_out(out: str) -> None:
    """Raise `ConfigError` unless `out` can become a results file: not a folder, not below a file, in a folder
    that can be written (a probe file is created there and removed: at `out` itself when its folder exists and
    it does not, which also tries its name, else a temporary name in the nearest folder that exists)."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise ConfigError(f"--out {out!r} names a folder; give a file path for the results, e.g. "
                          f"{os.path.join(out, 'results.json')!r}")
    path = os.path.abspath(out)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {out!r}: {parent!r} is a file, not a folder; give a file path in a folder")
    try:
        if parent == os.path.dirname(path) and not os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.remove(path)
        else:
            handle, probe = tempfile.mkstemp(prefix=".fusion-eval-probe-", dir=parent)
            os.close(handle)
            os.remove(probe)
    except OSError as err:
        raise ConfigError(f"--out {out!r}: the results cannot be written there ({err.strerror or err}, in "
                          f"{parent!r}); give a file path in a folder you can write to") from None


def run_eval(args: argparse.Namespace) -> int:
    """`fusion eval`: load the model folder, evaluate, print a table, write JSON (`--out`). Returns the exit code.

    `--device` and `--out` are checked before the model is loaded. If the results still cannot be written, the
    error is one line on stderr, the results JSON goes to stdout (nothing is lost) and the exit code is 1."""
    from ..distributed import parse_device
    from ..model import FusionModel

    # `--out=~/r.json`: no shell expands that ~ (expanded as `user_path` does, keeping a trailing "/": a folder)
    out = os.path.expanduser(os.fspath(args.out)) if args.out else None
    try:
        device = parse_device(getattr(args, "device", None), "--device")
        if out is not None:
            _check_out(out)
        model = FusionModel.from_pretrained(model_folder(args.model), device=device)
        results = evaluate(model, args.data, root=args.root, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, limit=args.limit,
                           progress=not getattr(args, "no_progress", False),
                           return_predictions=getattr(args, "predictions", False),
                           num_frames=getattr(args, "num_frames", None))
    except (ConfigError, DatasetError, CheckpointError) as err:
        print(f"fusion eval: {err}", file=sys.stderr)
        return 1
    results = {"model": os.fspath(args.model), **results}
    print(format_results(results))
    if out is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            write_json(out, results)  # through a temporary file: a failed write leaves neither a partial nor a stray file
        except OSError as err:  # checked before loading, yet failed (a full disk, a folder made read-only since)
            print(f"fusion eval: could not write the results to --out {out!r} ({err}); they follow as JSON",
                  file=sys.stderr)
            print(json.dumps(results, indent=2))
            return 1
        print(f"results written to {out}")
    return 0
