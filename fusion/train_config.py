"""Training configuration: a run is a list of stages, each naming its data, its length and a learning
rate per part. A rate of 0 (or a part left out) freezes that part for the stage.

    name: shapes-tiny
    output_dir: runs/shapes-tiny
    seed: 0
    model:                      # built from scratch (or `init_from: path/to/model/folder`, or `default`)
      tokenizer: {train_on: [data/shapes/text.jsonl], vocab_size: 1024}
      decoder: {hidden_size: 256, num_layers: 4, ...}          # DecoderConfig fields
      vision: {image_size: 64, patch_size: 8, width: 128, ...} # VisionEncoderConfig fields
      # also: adapter_hidden_size, pixel_shuffle_ratio, image_position_embedding, max_tiles, pad_with_mean,
      # video: {num_frames: 8, ...} (FusionConfig fields); vision_weights: an open_clip weight file (or
      # {path: FILE, quickgelu_check: false, allow_unsafe_pickle: true});
      # trunk: a Hugging Face Llama 4 folder, whose decoder and tokenizer replace decoder: and tokenizer:
    data:
      shapes_world: {out_dir: data/shapes, train_images: 4000} # generate the dataset first if missing
    distributed: {strategy: ddp}  # under torchrun: ddp, or fsdp2 (with gather_for_eval: true, every process
                                  # holds the whole model while it evaluates: faster, more memory)
    stages:
      - name: trunk
        data: data/shapes/text.jsonl
        steps: 600
        batch_size: 32
        lr: {decoder: 3.0e-4}
      - name: cotrain
        data: data/shapes/train.jsonl     # or a list; an entry may be {path, types, media, repeat} (DataSource)
        group_by_media: true
        lr: {vision: 1.0e-3, adapter: 1.0e-3}     # decoder frozen
        eval: {data: data/shapes/val.jsonl, every: 200, limit: 200}

Relative paths are resolved from the folder of the YAML file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .data.datasets import MEDIA_KINDS
from .errors import ConfigError

PARTS = ("vision", "adapter", "decoder")


def check_keys(given: dict, cls, where: str) -> None:
    """ConfigError naming each key of `given` that is not a field of the dataclass `cls` (or not one of the
    names `cls`, when it is a list of names), with the closest known key when there is one: `step` -> `steps`."""
    known = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls)
    unknown = [k for k in given if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                          f"known keys are {sorted(known)}")


def check_minimums(values: dict, minimums: dict[str, int], prefix: str) -> None:
    """ConfigError "{prefix}{name} must be >= {low}" for the first of `values` (None: not set) below its minimum."""
    for name, low in minimums.items():
        value = values.get(name)
        if value is not None and value < low:
            raise ConfigError(f"{prefix}{name} must be >= {low}, got {value}")


def _as_number(value, kind: type, what: str):
    """`value` as an int or a float, or ConfigError naming `what`. A number written as text is read
    (YAML 1.1 reads `1e-3` without a dot as a string), a bool is not a number."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{what} must be a number, got the text {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if kind is int:
        if number != int(number):
            raise ConfigError(f"{what} must be a whole number, got {value!r}")
        return int(number)
    return float(number)


def _scalar_fields(cls) -> dict[str, tuple[type, bool]]:
    """{field: (int, float or bool, whether it may be None)} for the dataclass `cls`'s fields of one such type."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])
        kinds = [a for a in args if a is not type(None)] if args else [hints[f.name]]
        if len(kinds) == 1 and kinds[0] in (int, float, bool):
            fields[f.name] = (kinds[0], type(None) in args)
    return fields


def check_field_types(obj, where: str) -> None:
    """Each int, float and bool field of the dataclass `obj` (optional ones may be None) checked, and
    numbers written as text converted; ConfigError naming the field otherwise."""
    for name, (kind, optional) in _scalar_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        what = f"{where}: {name}"
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{what} must be true or false, got {value!r}")
        else:
            setattr(obj, name, _as_number(value, kind, what))


def numbers_from_text(cls, settings: dict, where: str) -> dict:
    """`settings` for the dataclass `cls` with its int and float fields written as text (YAML 1.1's `1e-3`)
    read as numbers, before `cls` sees them; ConfigError naming a text that is no number."""
    fields = _scalar_fields(cls)
    return {key: _as_number(value, fields[key][0], f"{where}.{key}")
            if isinstance(value, str) and fields.get(key, (bool,))[0] in (int, float) else value
            for key, value in settings.items()}


@dataclass
class EvalConfig:
    data: str | None = None  # a dataset file; task accuracy is measured on it
    root: str | None = None  # the folder its media paths are relative to (default: the file's folder)
    every: int = 0  # steps between evaluations (0: only at the end of the stage)
    limit: int | None = 200  # samples used for the task accuracy (None: all)
    loss_batches: int = 4  # validation batches for the validation loss
    max_new_tokens: int = 24
    batch_size: int = 16  # questions answered together (under FSDP2 by each process: each forward gathers every
                          # block's weights, so a larger batch gathers them fewer times)


@dataclass
class DataSource:
    """One training file of a stage; in YAML a path, or a mapping for a part of the file or more of it::

        data:
          - data/shapes/train.jsonl
          - {path: data/shapes/train.jsonl, media: [video], repeat: 2}       # its videos twice more per epoch
          - {path: data/shapes/more.jsonl, types: [position, relation]}      # only these question types
          - {path: llava/train.json, root: /data/coco/images}               # media paths relative to root
    """

    path: str
    root: str | None = None  # the folder the file's media paths are relative to (default: the file's folder)
    types: list[str] | None = None  # keep only records whose `type` is one of these
    media: list[str] | None = None  # keep only records showing an image, a video or nothing ("text")
    repeat: int = 1  # the file's (kept) samples come this many times per epoch

    def check(self, where: str):
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{where}: a data entry needs a path (a dataset file), got {self.path!r}")
        if self.root is not None and (not isinstance(self.root, str) or not self.root):
            raise ConfigError(f"{where}: root of {self.path} must be a folder path, got {self.root!r}")
        for name in ("types", "media"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not value
                                      or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{where}: {name} of {self.path} must be a non-empty list of names, "
                                  f"got {value!r}")
        unknown = sorted(set(self.media or ()) - set(MEDIA_KINDS))
        if unknown:
            raise ConfigError(f"{where}: unknown media {unknown} for {self.path}; choose from {list(MEDIA_KINDS)}")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ConfigError(f"{where}: repeat of {self.path} must be an integer >= 1, got {self.repeat!r}")


def data_source(entry, where: str) -> DataSource:
    """A stage's data entry (a path, a mapping or a `DataSource`) as a checked `DataSource`."""
    if isinstance(entry, (str, Path)):
        entry = DataSource(str(entry))
    elif isinstance(entry, dict):
        check_keys(entry, DataSource, f"{where}: a data entry")
        entry = DataSource(**{"path": None, **entry})
    elif not isinstance(entry, DataSource):
        raise ConfigError(f"{where}: a data entry is a path or a mapping with a path, got {entry!r}")
    entry.check(where)
    return entry


@dataclass
class StageConfig:
    name: str
    data: str | list[str | DataSource]
    lr: dict[str, float]
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32  # samples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of each part's rate
    weight_decay: float = 0.0
    clip_grad_norm: float | None = 1.0
    group_by_media: bool = False  # one sample per run of questions about one image or video
    join_files: bool = False  # with group_by_media: a later file's questions about a medium join the earlier sample
    pack: bool = False
    max_length: int = 1024  # packing row length
    length_buckets: int = 1  # pad each micro-batch as up to N groups of similar length (less padding, same loss)
    max_row_tokens: int | None = None  # a grouped sample longer than this is computed as several rows (same loss)
    cache_samples: bool = False  # keep processed training samples, and the run's decoded media, in memory (see README)
    compile: bool = False  # torch.compile the decoder blocks for this stage's training steps (fusion/compilation.py)
    init_from: str | None = None  # start this stage from a model folder (`default`: the one fusion ships)
    eval: EvalConfig = field(default_factory=EvalConfig)
    aux_loss_coef: float | None = None  # override the decoder's aux-loss coefficient for this stage

    def __post_init__(self):
        where = f"stage {self.name!r}"
        if not isinstance(self.name, str) or self.name.strip() in ("", ".", "..") or any(c in self.name for c in "/\\"):
            raise ConfigError(f"{where}: a stage's name names its folder in the run (stages/NAME): give a text "
                              f"without '/' or '\\', e.g. name: cotrain")
        if isinstance(self.eval, str):  # `eval: val.jsonl`
            self.eval = EvalConfig(data=self.eval)
        elif isinstance(self.eval, dict):
            check_keys(self.eval, EvalConfig, f"{where}: eval")
            self.eval = EvalConfig(**self.eval)
        elif not isinstance(self.eval, EvalConfig):
            raise ConfigError(f"{where}: eval must be a dataset file or a mapping like {{data: val.jsonl, every: "
                              f"200, limit: 200}}, got {self.eval!r}")
        check_field_types(self, where)
        check_field_types(self.eval, f"{where}: eval")
        if self.pack and self.length_buckets > 1:
            raise ConfigError(f"{where}: pack: true puts samples into rows of max_length tokens, with no padding for "
                              f"length_buckets to save; leave length_buckets out (or pack: false)")
        if not isinstance(self.lr, dict):
            raise ConfigError(f"{where}: lr must map parts to rates, e.g. {{vision: 1.0e-4, decoder: 3.0e-4}}, "
                              f"got {self.lr!r}")
        self.lr = {part: _as_number(rate, float, f"{where}: lr of {part!r}") for part, rate in self.lr.items()}
        check_minimums(vars(self), {"batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "steps": 1,
                                    "length_buckets": 1, "max_row_tokens": 1, "max_length": 1}, f"{where}: ")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}: epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ConfigError(f"{where}: warmup_steps ({self.warmup_steps}) must be at most the stage's steps "
                              f"({self.steps}); the rate would never reach its peak")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"{where}: clip_grad_norm must be > 0 (or null: no clipping), got {self.clip_grad_norm}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{where}: min_lr_ratio (the fraction of each rate the cosine ends at) must be in "
                              f"[0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}: weight_decay must be >= 0, got {self.weight_decay}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigError(f"{where}: init_from must name a model folder (or `default`), got {self.init_from!r}")
        check_minimums(vars(self.eval), {"every": 0, "limit": 0, "loss_batches": 1, "max_new_tokens": 1,
                                         "batch_size": 1},
                       f"{where}: eval ")
        if self.eval.every and not self.eval.data:
            raise ConfigError(f"{where}: eval every {self.eval.every} steps needs eval data (a dataset file)")
        if isinstance(self.data, (str, dict, DataSource)):
            self.data = [self.data]
        if not self.data:
            raise ConfigError(f"stage {self.name!r}: data names no dataset file")
        self.data = [data_source(d, f"stage {self.name!r}") for d in self.data]
        unknown = sorted(set(self.lr) - set(PARTS))
        if unknown:
            raise ConfigError(f"stage {self.name!r}: unknown parts {unknown} in lr; the parts are {list(PARTS)}")
        if any(v < 0 for v in self.lr.values()):
            raise ConfigError(f"stage {self.name!r}: learning rates must be >= 0, got {self.lr}")
        if not any(v > 0 for v in self.lr.values()):
            raise ConfigError(f"stage {self.name!r}: every part is frozen (all learning rates are 0)")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"stage {self.name!r}: give exactly one of steps and epochs")
        if self.join_files and not self.group_by_media:
            raise ConfigError(f"stage {self.name!r}: join_files needs group_by_media: true")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"stage {self.name!r}: batch_size {self.batch_size} is not a multiple of "
                              f"grad_accum {self.grad_accum}")

    def rate(self, part: str) -> float:
        return float(self.lr.get(part, 0.0))

    def eval_source(self) -> DataSource:
        """The stage's eval data as a data entry (its file and media root)."""
        return DataSource(self.eval.data, root=self.eval.root)

    def total_steps(self, num_samples: int) -> int:
        """The stage's optimizer steps: `steps`, or `epochs` over its `num_samples` samples (known once its data
        is read); ConfigError when its warmup would not fit in them. An epoch is the full batches of one
        shuffled pass (`StageBatches` leaves out the last `num_samples % batch_size` samples, other ones each
        epoch), so `epochs: 1` trains no sample twice; a fraction of an epoch is rounded down, to one step at
        least."""
        # (the small margin keeps e.g. 0.29 epochs of 100 batches at 29 steps, not 28.999... -> 28)
        total = self.steps or max(1, math.floor(self.epochs * (num_samples // self.batch_size) + 1e-9))
        if self.warmup_steps > total:
            raise ConfigError(f"stage {self.name!r}: warmup_steps ({self.warmup_steps}) must be at most the stage's "
                              f"{total} steps ({self.epochs} epochs of {num_samples} samples in batches of "
                              f"{self.batch_size}); the rate would never reach its peak")
        return total


@dataclass
class TrainConfig:
    stages: list[StageConfig]
    output_dir: str = "runs/fusion"
    name: str = "fusion"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"  # auto (bf16 autocast where native, see fusion/precision.py) | fp32 | bf16
    device: str | None = None  # default: cuda if available, else cpu
    distributed: dict[str, Any] = field(default_factory=lambda: {"strategy": "ddp"})  # ddp | fsdp2 (under torchrun)
    log_every: int = 10
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints (0: only at stage ends)
    keep_checkpoints: int = 2
    num_workers: int = 0
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    # optimizer steps in a row whose loss or gradients are not finite (each one skipped) before the run stops
    max_skipped_steps: int = 10
    # MoE load balancing (the expert bias and the aux loss) counts real tokens only; true: padding too, as fusion
    # did until 2026-12 (the default model's recipe keeps it, to reproduce the shipped model's run)
    moe_count_padding: bool = False
    final_eval: dict[str, Any] | None = None  # {data: test.jsonl, limit: null}: `fusion eval` on the final model
    base_dir: str = "."  # folder that relative paths are resolved from (the YAML's folder)

    def __post_init__(self):
        if not isinstance(self.stages, list):
            raise ConfigError(f"stages must be a list of stages (each a mapping with name, data, lr, steps or "
                              f"epochs), got {self.stages!r}")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, (dict, StageConfig)):
                raise ConfigError(f"stages[{i}] must be a mapping with name, data, lr and steps or epochs, got "
                                  f"{stage!r}")
            if isinstance(stage, dict):
                where = f"stage {stage.get('name', i)!r}"
                check_keys(stage, StageConfig, where)
                missing = [k for k in ("name", "data", "lr") if k not in stage]
                if missing:
                    raise ConfigError(f"{where}: missing {', '.join(missing)} (a stage needs a name, its data and "
                                      f"a learning rate per part it trains)")
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        check_field_types(self, "training config")
        if not self.stages:
            raise ConfigError("a training config needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        check_minimums(vars(self), {"log_every": 1, "checkpoint_every": 0, "keep_checkpoints": 1, "num_workers": 0,
                                    "threads": 1, "max_skipped_steps": 1}, "training config: ")
        for name, example in (("model", "{init_from: default} or {decoder: {...}, vision: {...}}"),
                              ("data", "{shapes_world: {out_dir: data/shapes}}"),
                              ("distributed", "{strategy: fsdp2}")):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"training config: {name} must be a mapping, e.g. {name}: {example}; got "
                                  f"{getattr(self, name)!r}")
        check_keys(self.distributed, ["strategy", "gather_for_eval"], "distributed")
        if self.distributed.get("strategy", "ddp") not in ("ddp", "fsdp2"):
            raise ConfigError(f"distributed.strategy must be ddp or fsdp2, got {self.distributed.get('strategy')!r}")
        self._check_gather_for_eval()
        self._check_data()
        self.final_eval = _final_eval(self.final_eval)
        if self.device is not None:
            from .distributed import parse_device

            parse_device(self.device, "training config: device")

    def _check_gather_for_eval(self):
        """`distributed.gather_for_eval` (FSDP2): true to hold the whole model in every process while it
        evaluates (faster; its memory grows by the shards it does not hold), false (the default) to keep it
        sharded, each block's weights gathered whenever it runs. Under DDP every process holds the whole model
        anyway and the option changes nothing."""
        gather = self.distributed.get("gather_for_eval", False)
        if not isinstance(gather, bool):
            raise ConfigError(f"distributed.gather_for_eval must be true or false, got {gather!r}")
        if gather and self.distributed.get("strategy") == "fsdp2":
            import torch

            from .distributed import gathering_whole_supported

            if not gathering_whole_supported():
                raise ConfigError(f"distributed.gather_for_eval needs torch 2.7 or later "
                                  f"(FSDPModule.set_reshard_after_forward), this is torch {torch.__version__}: "
                                  f"upgrade torch or leave the option out (the evaluation then runs sharded)")

    def _check_data(self):
        unknown = sorted(set(self.data) - {"shapes_world"})
        if unknown:
            raise ConfigError(f"data: unknown keys {unknown}; the only one is shapes_world (a synthetic world to "
                              f"generate before training); a stage names its own dataset files")
        spec = self.data.get("shapes_world")
        if spec is None:
            return
        if not isinstance(spec, dict) or not spec.get("out_dir"):
            raise ConfigError(f"data.shapes_world must be a mapping with out_dir (the folder to write the world "
                              f"to) and ShapesWorldConfig settings, got {spec!r}")
        from .data.shapes_world import ShapesWorldConfig

        settings = {k: v for k, v in spec.items() if k != "out_dir"}
        check_keys(settings, ShapesWorldConfig, "data.shapes_world")
        try:
            ShapesWorldConfig(**settings)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"data.shapes_world: {err}") from err

    def path(self, p: str | None) -> Path | None:
        """Resolve a path from the config file's folder."""
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, base_dir: str | Path = ".") -> "TrainConfig":
        check_keys(d, cls, "training config")
        if "stages" not in d:
            raise ConfigError("training config: no stages; list at least one under `stages:`")
        return cls(**{**d, "base_dir": str(base_dir)})


_FINAL_EVAL_KEYS = ("data", "root", "limit", "batch_size")


def _final_eval(spec) -> dict | None:
    """`final_eval` checked: None, a dataset file, or {data, root, limit, batch_size} (data required)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"data": spec}
    if not isinstance(spec, dict) or not spec.get("data"):
        raise ConfigError(f"final_eval must be a dataset file or a mapping like {{data: test.jsonl, limit: 500}}, "
                          f"got {spec!r}")
    check_keys(spec, _FINAL_EVAL_KEYS, "final_eval")
    if "batch_size" in spec and spec["batch_size"] is None:  # null: the default
        del spec["batch_size"]
    for name in ("limit", "batch_size"):
        if spec.get(name) is not None:
            spec[name] = _as_number(spec[name], int, f"final_eval: {name}")
    check_minimums(spec, {"limit": 0, "batch_size": 1}, "final_eval: ")
    return spec


def load_train_config(path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config in the YAML file `path`, with `overrides` (`KEY=VALUE`, see `set_config_value`)
    applied in order before it is checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        hint = ("; it looks like a dataset file: `fusion train` takes a YAML training config that names the "
                "dataset under a stage's data (see the README's \"Fine-tuning on your own data\")"
                if path.suffix in (".jsonl", ".json") else "")
        raise ConfigError(f"{path} is not valid YAML: {err}{hint}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        set_config_value(data, override)
    return TrainConfig.from_dict(data, base_dir=path.parent.resolve())


def _own_copy(node):
    """A shallow copy of a mapping or list (anything else as it is)."""
    return dict(node) if isinstance(node, dict) else list(node) if isinstance(node, list) else node


def set_config_value(data: dict, override: str) -> None:
    """Apply `KEY=VALUE` to the config mapping `data` in place (`fusion train CONFIG --set KEY=VALUE`).

    KEY is a dotted path: `model.decoder.hidden_size`, `final_eval.limit`; in a list, an index
    (`stages.2.steps`) or, among the stages, a stage's name (`stages.relation.steps`). VALUE is read as YAML
    (`192`, `true`, `null`, `[a, b]`, `{data: val.jsonl}`). A missing key is added (the config's own checks
    then name a misspelt one), a missing mapping on the way created."""
    key, sep, text = override.partition("=")
    where = f"--set {override}"
    if not sep or not key.strip():
        raise ConfigError(f"{where}: give KEY=VALUE, e.g. --set stages.relation.steps=500")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: the value is not valid YAML ({err})") from None
    parts = key.strip().split(".")
    node = data
    # each mapping and list on the path is copied before it is written to: YAML anchors (`lr: *rates`) share one
    # object between several places, and the setting named is to change in the one place named only
    depth = 0
    while depth < len(parts):
        part, taken = parts[depth], 1
        if isinstance(node, list):
            names = [item.get("name") if isinstance(item, dict) else None for item in node]
            # a stage's name may hold dots (`stages.v1.2.steps`): the longest run of parts that names one
            named = [k for k in range(len(parts) - depth, 0, -1) if ".".join(parts[depth:depth + k]) in names]
            if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                index = int(part)
            elif named:
                taken = named[0]
                index = names.index(".".join(parts[depth:depth + taken]))
            else:
                raise ConfigError(f"{where}: {'.'.join(parts[:depth]) or 'the config'} is a list of {len(node)}; "
                                  f"{part!r} is neither an index nor one of its names {[n for n in names if n]}")
            if depth + taken == len(parts):
                node[index] = value
            else:
                node[index] = _own_copy(node[index])
                node = node[index]
        elif isinstance(node, dict):
            if depth + 1 == len(parts):
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                elif isinstance(node[part], str) and part in ("eval", "final_eval"):  # `eval: val.jsonl`
                    node[part] = {"data": node[part]}
                node[part] = _own_copy(node[part])
                node = node[part]
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is {node!r}, which has no key {part!r}")
        depth += taken
