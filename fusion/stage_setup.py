"""What a training stage starts from: the model a config builds (or the folder it names), its tokenizer,
which parts train, and the optimizer and learning-rate schedule over them."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from tokenizer import FusionTokenizer, TokenizerError, text_without_markers
from vision.encoder import VisionEncoderConfig
from vision.errors import WeightsError

from .checkpoint import model_folder
from .decoder import Decoder
from .hf_llama4 import read_hf_decoder_config
from .data.datasets import ConversationDataset
from .decoder_config import DecoderConfig
from .errors import CheckpointError, ConfigError
from .fusion_config import FusionConfig
from .model import FusionModel
from .processor import VideoSettings
from .train_config import StageConfig, TrainConfig, check_keys, numbers_from_text

# keys under `model:` that are not FusionConfig fields
_MODEL_BUILD_KEYS = {"init_from", "tokenizer", "vision_weights", "trunk"}
# what a Hugging Face Llama 4 checkpoint folder given as `model.trunk` must hold
_TRUNK_FILES = ("config.json", "tokenizer.json")
_FUSION_FIELDS = {f.name for f in dataclasses.fields(FusionConfig)}
# keys under `model: tokenizer:`
_TOKENIZER_KEYS = ("path", "train_on", "vocab_size", "min_frequency")
# keys of `model: vision_weights:` written as a mapping (the path, the VisionEncoder's options for reading it)
_VISION_WEIGHTS_KEYS = ("path", "quickgelu_check", "allow_unsafe_pickle")
_VISION_WEIGHTS_OPTIONS = {"quickgelu_check": "quickgelu_check=False",  # (as a refusal's message names each)
                           "allow_unsafe_pickle": "allow_unsafe_pickle=True"}


def check_model_section(config: TrainConfig) -> None:
    """ConfigError for a mistake in `config.model`, found before anything runs: the model's settings are
    checked without building it (its tokenizer may be trained on files a run has still to generate)."""
    spec = dict(config.model)
    if spec.get("init_from"):
        ignored = sorted(key for key, value in spec.items() if key != "init_from" and value is not None)
        if ignored:
            raise ConfigError(f"model: init_from loads the saved model as it is, so {ignored} would be ignored; "
                              f"remove them (a model with other settings is built from scratch, without init_from)")
        return
    unknown = sorted(set(spec) - _FUSION_FIELDS - _MODEL_BUILD_KEYS)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} under model:")
    if spec.get("trunk") is not None:
        check_trunk(spec, config)
    vision_weights(spec, config)
    tokenizer = spec.get("tokenizer") or {}
    if not isinstance(tokenizer, dict):
        raise ConfigError(f"model.tokenizer must be a mapping with `path` or `train_on`, got {tokenizer!r}")
    check_keys(tokenizer, _TOKENIZER_KEYS, "model.tokenizer")
    for key in ("decoder", "vision", "video"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise ConfigError(f"model.{key} must be a mapping of its settings, e.g. {key}: {{...}}; got {spec[key]!r}")
    try:  # each part's settings check their own ranges (DecoderConfig, VisionEncoderConfig, VideoSettings)
        FusionConfig(**model_settings(spec))
    except (ConfigError, CheckpointError):
        raise
    except (ValueError, TypeError) as err:  # a decoder / vision / video setting the model cannot take
        raise ConfigError(f"model: {err}") from err


def build_model(config: TrainConfig, trunk_weights: bool = True) -> FusionModel:
    """A new model from `config.model` (FusionConfig fields plus `tokenizer`, `vision_weights` and `trunk`), or
    the folder `config.model["init_from"]`. `trunk_weights=False` (`--check`): a trunk's decoder is built on the
    meta device from its config, its weights not read."""
    check_model_section(config)
    spec = dict(config.model)
    if spec.get("init_from"):
        return FusionModel.from_pretrained(model_folder(spec["init_from"], config.base_dir))
    if spec.get("trunk") is not None:
        return model_on_trunk(spec, config, weights=trunk_weights)
    tokenizer = build_tokenizer(spec.get("tokenizer") or {}, config)
    settings = model_settings(spec)
    decoder = dict(settings.get("decoder") or {})
    settings["decoder"] = {**decoder, "vocab_size": max(decoder.get("vocab_size", 0), len(tokenizer))}
    fusion_config = FusionConfig(**settings)  # it builds its decoder, vision and video settings from the dicts
    torch.manual_seed(config.seed)
    return model_with_vision_weights(spec, config, fusion_config, tokenizer)


def vision_weights(spec: dict, config: TrainConfig) -> tuple[Path | None, dict]:
    """`model.vision_weights`: the path of an open_clip weight file, or a mapping of its `path` and the options
    of reading it (`quickgelu_check: false`, `allow_unsafe_pickle: true`, as `VisionEncoder` takes them).
    Returns the path (None where there is none) and those options; ConfigError for anything else."""
    value = spec.get("vision_weights")
    if value is None:
        return None, {}
    if isinstance(value, str):
        return config.path(value), {}
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise ConfigError(f"model.vision_weights must be the path of an open_clip weight file, or a mapping with "
                          f"its `path` and the options of reading it, e.g. {{path: FILE, quickgelu_check: false}}; "
                          f"got {value!r}")
    check_keys(value, _VISION_WEIGHTS_KEYS, "model.vision_weights")
    options = {key: value[key] for key in _VISION_WEIGHTS_OPTIONS if key in value}
    for key, option in options.items():
        if not isinstance(option, bool):
            raise ConfigError(f"model.vision_weights.{key} must be true or false, got {option!r}")
    return config.path(value["path"]), options


def model_with_vision_weights(spec: dict, config: TrainConfig, fusion_config: FusionConfig, tokenizer,
                              decoder: Decoder | None = None) -> FusionModel:
    """`FusionModel(fusion_config, tokenizer, decoder=decoder)` with the tower of `model.vision_weights` (read
    with its options); a weight file refused for a reason one of those options overrides says how to write it
    in the config."""
    path, options = vision_weights(spec, config)
    try:
        return FusionModel(fusion_config, tokenizer, vision_weights=path, decoder=decoder, **options)
    except WeightsError as err:
        written = [key for key, argument in _VISION_WEIGHTS_OPTIONS.items() if argument in str(err)]
        if not written:
            raise
        setting = f"{written[0]}: {'false' if written[0] == 'quickgelu_check' else 'true'}"
        raise WeightsError(f"model.vision_weights: {err}\nIn a training config that option is written "
                           f"`vision_weights: {{path: {path}, {setting}}}`") from err


def check_trunk(spec: dict, config: TrainConfig) -> None:
    """`ConfigError` for a `model.trunk` that cannot work: settings beside it that it replaces, a folder that is
    not a Hugging Face checkpoint with its tokenizer."""
    clash = sorted(key for key in ("decoder", "tokenizer") if spec.get(key) is not None)
    if clash:
        raise ConfigError(f"model: trunk brings the decoder's settings and weights and its tokenizer, so {clash} "
                          f"cannot stand beside it; remove {' and '.join(clash)}")
    if not isinstance(spec["trunk"], str):
        raise ConfigError(f"model.trunk must be the path of a Hugging Face Llama 4 checkpoint folder, got "
                          f"{spec['trunk']!r}")
    folder = config.path(spec["trunk"])
    missing = [name for name in _TRUNK_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"model.trunk: {str(folder)!r} is not a Hugging Face Llama 4 checkpoint folder with its "
                          f"tokenizer: {' and '.join(missing)} missing" + ("" if folder.is_dir() else
                                                                            " (no such folder)"))


def model_on_trunk(spec: dict, config: TrainConfig, weights: bool = True) -> FusionModel:
    """A new model on the pretrained language trunk of `model.trunk`, a Hugging Face Llama 4 checkpoint folder:
    its decoder (settings and text weights, in float32 for training; `weights=False`: on the meta device, its
    weights not read) and its tokenizer (`FusionTokenizer.from_llama4`); the tower (or `vision_weights`) and the
    adapter as `model:` sets them."""
    folder = config.path(spec["trunk"])
    try:
        tokenizer = FusionTokenizer.from_llama4(folder)
    except (OSError, TokenizerError) as err:
        raise ConfigError(f"model.trunk: {err}") from err
    if weights:
        decoder = Decoder.from_hf(folder, dtype=torch.float32)
    else:
        decoder = Decoder.unallocated(read_hf_decoder_config(folder)[0])
    if decoder.config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.trunk: the tokenizer of {str(folder)!r} has {len(tokenizer)} tokens, more than "
                          f"the decoder's vocab_size {decoder.config.vocab_size}: they are not one checkpoint's")
    settings = {**model_settings(spec), "decoder": decoder.config}
    torch.manual_seed(config.seed)
    return model_with_vision_weights(spec, config, FusionConfig(**settings), tokenizer, decoder)


def model_settings(spec: dict) -> dict:
    """The FusionConfig fields of a config's `model:` section, numbers written as text read as numbers (in it
    and in its decoder, vision and video sections, as in the rest of a config)."""
    settings = numbers_from_text(FusionConfig, {key: value for key, value in spec.items()
                                                if key in _FUSION_FIELDS and value is not None}, "model")
    for key, cls in (("decoder", DecoderConfig), ("vision", VisionEncoderConfig), ("video", VideoSettings)):
        if isinstance(settings.get(key), dict):
            settings[key] = numbers_from_text(cls, settings[key], f"model.{key}")
    return settings


def build_tokenizer(spec: dict, config: TrainConfig) -> FusionTokenizer:
    """The tokenizer `model.tokenizer` names: `path` (a tokenizer.json, or its folder), or one trained on the
    conversations of the dataset files `train_on` (`vocab_size`, `min_frequency`)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"model.tokenizer must be a mapping with `path` or `train_on`, got {spec!r}")
    check_keys(spec, _TOKENIZER_KEYS, "model.tokenizer")
    if spec.get("path"):
        try:
            return FusionTokenizer.load(config.path(spec["path"]))
        except OSError as err:  # a missing or unreadable tokenizer file is a mistake in the config
            raise ConfigError(f"model.tokenizer.path: {err}") from err
    files = spec.get("train_on")
    if not files:
        raise ConfigError("model.tokenizer needs `path` (a tokenizer.json) or `train_on` (dataset files)")
    files = [files] if isinstance(files, str) else files
    return FusionTokenizer.train(_texts_of([config.path(f) for f in files]), vocab_size=spec.get("vocab_size", 1024),
                                 min_frequency=spec.get("min_frequency", 2))


def _texts_of(paths):
    """The texts a conversation of JSONL / LLaVA JSON dataset files puts through BPE: each turn's message
    (media markers removed) and its header's text (the role name, then the blank line), so that the
    tokenizer learns the chat format's own words too (one token for "assistant", not seven).

    The records are the ones training reads (`ConversationDataset`): the same turn styles and typed
    content parts, malformed lines skipped with a `DatasetWarning`, and `DatasetError` for a file that
    is missing or mostly bad. An escaped marker (`\\<image>`) is the text it stands for."""
    for path in paths:
        # reading records needs no processor: only `dataset[i]` (not used here) processes a sample
        for record in ConversationDataset(path, processor=None).records:
            for message in record.messages:
                # what the chat template encodes between <|header_start|> and a message, then the message's text
                yield from (message["role"], "\n\n")
                yield text_without_markers(message["content"]).strip()


def set_trainable(model: FusionModel, stage: StageConfig):
    """requires_grad and train/eval mode per part, from the stage's learning rates."""
    for name, part in model.parts().items():
        trainable = stage.rate(name) > 0
        part.requires_grad_(trainable)
        part.train(trainable)


def build_optimizer(model: FusionModel, stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW with one group per (part, decay or not); only trainable parts are in it."""
    groups = []
    for name, part in model.parts().items():
        rate = stage.rate(name)
        if rate <= 0:
            continue
        decay = [p for p in part.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in part.parameters() if p.requires_grad and p.ndim < 2]
        groups.append({"params": decay, "lr": rate, "weight_decay": stage.weight_decay, "part": name})
        groups.append({"params": no_decay, "lr": rate, "weight_decay": 0.0, "part": name})
    groups = [g for g in groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused)


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine from 1 down to `min_ratio` at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
