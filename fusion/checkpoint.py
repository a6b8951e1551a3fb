"""Model folders on disk, written so that a crash never leaves a half-written folder behind.

A model folder holds `config.json` (format version, model settings, the preprocessing), `model.safetensors`
and `tokenizer.json`; loading needs nothing else. Where a model folder is asked for by name (a training
config's `init_from`, `fusion eval`), `default` names the model that ships with fusion (`fusion/default_model/`).
"""
from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokenizer import FusionTokenizer, TokenizerError
from vision.image import ImageProcessor

from .errors import CheckpointError
from .fusion_config import FORMAT_VERSION, FusionConfig
from .processor import FusionProcessor, VideoSettings

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
DEFAULT_MODEL = "default"  # the name of the model that ships with fusion, where a model folder is asked for
DEFAULT_MODEL_FOLDER = "default_model"  # its folder inside the installed `fusion` package


def default_model_location():
    """Where the default model lives: the folder `default_model` inside the installed `fusion` package."""
    return importlib.resources.files("fusion") / DEFAULT_MODEL_FOLDER


def model_folder(name, base=None) -> Path:
    """The model folder a config or a command line names: `default` is the model that ships with fusion (a
    folder called so is `./default`), anything else a path, relative to `base` (default: the working folder)."""
    if os.fspath(name) == DEFAULT_MODEL:
        return Path(str(default_model_location()))
    path = Path(name).expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    If the block raises, the temporary folder is removed and `path` is untouched. An existing folder
    at `path` is moved aside first and deleted only after the new one is in place. The folder and its
    files get the usual permissions for the process's umask (not the private ones of a temporary folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _flush_files(tmp)
        tmp.chmod(0o777 & ~_current_umask())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_folder(path.parent)  # the rename itself survives a power cut
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def files_replaced_in(folder):
    """Yield a temporary folder inside the existing `folder`; on success each file written there replaces
    the file of that name in `folder` by a rename (never a truncated file), and the folder's other files
    and subfolders are left as they were. If the block raises, `folder` is untouched."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=".fusion-save-", dir=folder))
    try:
        yield tmp
        _flush_files(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, folder / f.name)
        fsync_folder(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _flush_files(folder: Path) -> None:
    """Flush the contents of `folder`'s files to disk (before a rename makes them visible) and give them the
    usual permissions for the process's umask (not the private ones of a temporary folder)."""
    umask = _current_umask()
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
            f.chmod(0o666 & ~umask)


def fsync_folder(path) -> None:
    """Flush a folder's entries (renames into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomically(path, text: str) -> None:
    """Write `text` through a temporary file, flushed to disk, and a rename (never a truncated file, even
    after a power cut). If writing fails (a full disk), the file at `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_json(path, data) -> None:
    """`data` as indented JSON, written by `write_text_atomically`."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model_folder(model, path, state: dict | None = None) -> None:
    """Write a model folder; `state` replaces `model.state_dict()` (e.g. gathered from a sharded model).

    A new folder appears whole (written beside it, then one rename). In an existing folder the model's three
    files are replaced, each by a rename, and everything else in it (a README, logs, other runs) is kept."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a model folder at {str(path)!r}: it is a file; give a folder path")
    config = {"model_type": "fusion", **model.config.to_dict(), "preprocessing": model.processor.to_dict(),
              "special_tokens": {"bos": model.tokenizer.bos_id, "pad": model.tokenizer.pad_id,
                                 "patch": model.tokenizer.patch_id, "stop": list(model.tokenizer.stop_ids)}}
    with (files_replaced_in(path) if path.is_dir() else atomic_folder(path)) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state if state is not None else model_state(model), str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "fusion_format_version": str(FORMAT_VERSION)})
        model.tokenizer.save(tmp / TOKENIZER_FILE)


def read_model_config(path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist (expected a folder written by "
                              f"FusionModel.save_pretrained or `fusion train`)")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"model folder {str(folder)!r} is incomplete: {', '.join(missing)} missing")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({err})") from err
    if config.get("model_type", "fusion") != "fusion":
        raise CheckpointError(f"{folder} holds a {config.get('model_type')!r} model, not a fusion model "
                              "(for Hugging Face Llama 4 folders use fusion.Decoder.from_hf)")
    return config


def load_model_folder(path, device=None, dtype: torch.dtype | None = None):
    from .model import FusionModel

    folder = model_folder(path)  # "default": the model that ships with fusion, as everywhere a folder is named
    saved = read_model_config(folder)
    preprocessing = saved.get("preprocessing")
    settings = {k: v for k, v in saved.items() if k not in ("model_type", "preprocessing", "special_tokens")}
    try:
        config = FusionConfig.from_dict(settings)
    except (ValueError, TypeError, KeyError) as err:  # a key this version does not know, a value out of range
        raise CheckpointError(f"{folder / CONFIG_FILE} cannot be used: {err}") from err
    try:
        tokenizer = FusionTokenizer.load(folder / TOKENIZER_FILE)
    except TokenizerError as err:
        raise CheckpointError(f"{folder / TOKENIZER_FILE} cannot be used: {err}") from err
    try:
        model = FusionModel(config, tokenizer)
    except ValueError as err:  # a config that does not fit its tokenizer (e.g. a smaller vocabulary)
        raise CheckpointError(f"{folder / CONFIG_FILE} does not fit {folder / TOKENIZER_FILE}: {err}") from err
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{folder / WEIGHTS_FILE} cannot be read ({err}); the file is damaged") from err
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ from the config
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE}: {err}") from err
    missing = [k for k in result.missing_keys]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match its config: missing {missing[:4]}, "
                              f"unexpected {result.unexpected_keys[:4]}")
    if preprocessing is not None:  # the saved preprocessing is the truth, whatever library defaults are now
        try:
            model.processor = FusionProcessor(tokenizer, ImageProcessor.from_dict(preprocessing["image_processor"]),
                                              preprocessing["tokens_per_tile"], VideoSettings(**preprocessing["video"]))
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{folder / CONFIG_FILE}: its preprocessing settings cannot be used "
                                  f"({type(err).__name__}: {err})") from err
    if dtype is not None:
        model.to(dtype)
    return model.to(device or "cpu").eval()
