"""Model folders on disk, written so that a crash never leaves a half-written folder behind.

A model folder holds `config.json` (format version, model settings, the preprocessing), `model.safetensors`
and `tokenizer.json`; loading needs nothing else. Where a model folder is asked for by name (a training
config's `init_from`, `fusion eval`), `default` names the model that ships with fusion (`fusion/default_model/`).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import importlib.resources
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tokenizer import FusionTokenizer, TokenizerError
from vision.image import ImageProcessor

from .errors import CheckpointError
from .fusion_config import FORMAT_VERSION, FusionConfig
from .processor import CHAT_FORMAT, FusionProcessor, VideoSettings

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
# the hidden names of a copy being written (`.NAME.tmp-XXXX`), of a folder moved aside (`.NAME.old-XXXX`) and of
# the files written into a model folder to replace its own (`.fusion-save-XXXX`, inside it)
TEMPORARY_MARK, MOVED_ASIDE_MARK, REPLACEMENT_PREFIX = ".tmp-", ".old-", ".fusion-save-"
DEFAULT_MODEL = "default"  # the name of the model that ships with fusion, where a model folder is asked for
DEFAULT_MODEL_FOLDER = "default_model"  # its folder inside the installed `fusion` package


def default_model_location():
    """Where the default model lives: the folder `default_model` inside the installed `fusion` package."""
    return importlib.resources.files("fusion") / DEFAULT_MODEL_FOLDER


def model_folder(name, base=None) -> Path:
    """The model folder a config or a command line names: the string `default` is the model that ships with
    fusion (a folder called so is `./default`, and a warning says so when one is there), anything else (a
    `Path` always) a path, relative to `base` (default: the working folder)."""
    if isinstance(name, str) and name == DEFAULT_MODEL:
        warn_of_a_folder_called_default(base)
        return Path(str(default_model_location()))
    path = user_path(name)
    return path if path.is_absolute() or base is None else Path(base) / path


def warn_of_a_folder_called_default(base=None) -> None:
    """Where `default` is read as the model that ships with fusion: a warning when `base` (default: the working
    folder) holds a model folder called `default`, which that name does not load."""
    beside = (Path(base) if base is not None else Path.cwd()) / DEFAULT_MODEL
    if (beside / CONFIG_FILE).is_file():
        warnings.warn(f"'{DEFAULT_MODEL}' names the model that ships with fusion, not the model folder "
                      f"{str(beside)!r}; to use that folder, name it './{DEFAULT_MODEL}' (or by its full path)",
                      UserWarning, stacklevel=3)


def user_path(path) -> Path:
    """A path as the user wrote it, `~` (a home folder) expanded: where a folder is written and read."""
    return Path(path).expanduser()


@contextlib.contextmanager
def atomic_folder(path, carry_over: bool = False, left_behind=()):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    If the block raises, the temporary folder is removed and `path` is untouched. An existing folder
    at `path` is swapped with the new one in one step where the system can (`exchange_paths`: Linux), so that
    `path` is never absent; elsewhere it is moved aside first; it is deleted only after the new one is in place.
    The folder and its files get the usual permissions for the process's umask (not the private ones of a
    temporary folder).

    `carry_over`: the entries of the existing folder that the block did not write (a README, logs, other
    runs), except those named in `left_behind`, are moved into the new folder before the swap (and back if
    it fails), so that `path` never holds a mix of old and new files; the folder keeps its permissions. Where
    the system refuses to move the folder or an entry of it (a bind mount, a mount inside it, a subfolder this
    process may not move), its written files replace those of `path` one rename at a time instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMPORARY_MARK}", dir=path.parent))
    new_folder = os.stat(tmp).st_ino  # (which folder `path` holds, after a swap cut short)
    carry_over = carry_over and path.is_dir()
    mode = stat.S_IMODE(path.stat().st_mode) if carry_over else 0o777 & ~_current_umask()
    carried, old, swapping = [], None, False
    try:
        yield tmp
        _flush_files(tmp)
        swapping, written = True, sorted(entry.name for entry in tmp.iterdir())
        for entry in sorted(path.iterdir()) if carry_over else []:
            if entry.name not in left_behind and not os.path.lexists(tmp / entry.name):
                os.replace(entry, tmp / entry.name)
                carried.append(entry.name)
        if path.exists() and exchange_paths(tmp, path):
            old = tmp  # (the old folder, now under the temporary name)
        else:
            if path.exists():  # (named after the temporary folder: a name no other writer uses)
                old = path.parent / f".{path.name}{MOVED_ASIDE_MARK}{tmp.name.rsplit(TEMPORARY_MARK, 1)[1]}"
                os.replace(path, old)
            os.replace(tmp, path)
    except BaseException as err:
        if swapping and _inode(path) == new_folder:  # cut short (Ctrl-C) just after the swap: the new folder is in
            path.chmod(mode)                         # place, whole; the old one goes
            shutil.rmtree(tmp if old is None else old, ignore_errors=True)
            raise
        if old is not None and not os.path.lexists(path):
            os.replace(old, path)  # the swap failed halfway: the old folder goes back ...
        for name in carried:  # ... with the entries carried out of it
            os.replace(tmp / name, path / name)
        if swapping and carry_over and isinstance(err, OSError) and err.errno in _CANNOT_MOVE:
            _replace_files(tmp, path, written, left_behind)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    path.chmod(mode)  # (only now: a read-only mode on the temporary folder would stop its clean-up)
    fsync_folder(path.parent)  # the rename itself survives a power cut
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # (linux/fcntl.h, linux/fs.h)


def exchange_paths(a, b) -> bool:
    """Swap the entries at paths `a` and `b` in one step (Linux's `renameat2` with RENAME_EXCHANGE), so that
    neither path is ever absent. False, with nothing changed, where the system has no such call (another
    platform, a C library or kernel without it, a file system that does not support it): rename in two steps
    then."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2():
    """The C library's `renameat2` (glibc >= 2.28), None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2


@contextlib.contextmanager
def files_replaced_in(folder, left_behind=()):
    """Yield a temporary folder inside the existing `folder`; on success each file written there replaces
    the file of that name in `folder` by a rename (never a truncated file), the entries named in `left_behind`
    are deleted, and the folder's other files and subfolders are left as they were. If the block raises,
    `folder` is untouched. (Each file is replaced on its own: `model_folder_writer` uses this only where the
    folder cannot be swapped as a whole.)"""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=REPLACEMENT_PREFIX, dir=folder))
    try:
        yield tmp
        _flush_files(tmp)
        _replace_files(tmp, folder, sorted(f.name for f in tmp.iterdir()), left_behind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# what `os.replace` raises for a folder the system will not move (permissions, a mount, another file system)
_CANNOT_MOVE = {errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV}


def _replace_files(source: Path, folder: Path, names, left_behind=()) -> None:
    """Each of `names` in `source` replaces the entry of that name in `folder` by a rename (never a truncated
    file); the entries named in `left_behind` are deleted."""
    for name in names:
        os.replace(source / name, folder / name)
    for name in left_behind:
        (folder / name).unlink(missing_ok=True)
    fsync_folder(folder)


def model_folder_writer(path, left_behind=()):
    """A context manager that yields a temporary folder for a model folder's files, which then become `path`'s.

    A new folder appears whole (one rename). An existing one is replaced as one unit: its other entries (a
    README, logs, other runs) are carried into the new folder, except those named in `left_behind` (stale files
    of the old model), and the folders are swapped by renames, so that `path` holds all of the old files or all
    of the new ones, never a mix. A folder that cannot be renamed (a mount point, the working folder, one in a
    folder this process may not write to) has its files replaced one rename at a time instead."""
    path = Path(path)
    if not path.is_dir():
        return atomic_folder(path)
    path = path.resolve()  # a link to a folder stays a link: the folder it points to is replaced
    if not os.path.ismount(path) and os.access(path.parent, os.W_OK | os.X_OK) and not _is_working_folder(path):
        return atomic_folder(path, carry_over=True, left_behind=left_behind)
    return files_replaced_in(path, left_behind)


def _is_working_folder(path: Path) -> bool:
    try:
        return os.path.samefile(path, os.getcwd())
    except OSError:  # no working folder (deleted)
        return False


def remove_stale_temporaries(folder, names: str | None = None) -> list[str]:
    """Delete what writers killed halfway (SIGKILL, a power cut) left in `folder`: the hidden temporary copies
    of `atomic_folder` and `write_text_atomically` whose target's name matches the regular expression `names`
    (a folder moved aside is deleted only where the folder that replaced it is in place), and those of
    `files_replaced_in` (in a model folder). Returns their names."""
    folder = Path(folder)
    copy = rf"\.({names or '(?!)'})({re.escape(TEMPORARY_MARK)}|{re.escape(MOVED_ASIDE_MARK)})"  # (?!): none
    pattern = re.compile(rf"(?:{copy}|{re.escape(REPLACEMENT_PREFIX)})[A-Za-z0-9_]+")
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(2) == MOVED_ASIDE_MARK and not (folder / match.group(1)).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


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
    # (the name cut so that the temporary one stays within the usual 255-byte limit of a file name)
    tmp = path.with_name(f".{path.name[:200]}{TEMPORARY_MARK}{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error to raise is the write's, not this clean-up's
            tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_json(path, data) -> None:
    """`data` as indented JSON, written by `write_text_atomically`."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def write_safetensors(state: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, whose failed writes (a full disk, a quota) are raised as the OSError they are,
    not as safetensors' own error type."""
    try:
        save_file(state, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err


# safetensors' names of the dtypes a model folder may hold
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


class StreamedState:
    """A model's state dict to be written one tensor at a time: `layout` lists each tensor's name, dtype and
    shape (all a safetensors header needs), and iterating yields `(name, tensor)` in that order, each tensor
    made only when it is reached (e.g. gathered from the processes that hold its shards). `drain()` makes the
    ones not yet made (where making one is a collective, a process that stopped writing still takes part)."""

    def __init__(self, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], make):
        self.layout, self._make, self._next = layout, make, 0

    def __iter__(self):
        while self._next < len(self.layout):
            name = self.layout[self._next][0]
            self._next += 1
            yield name, self._make(name)

    def drain(self) -> None:
        for _ in self:
            pass


def write_safetensors_streamed(state: StreamedState, path, metadata: dict[str, str] | None = None) -> None:
    """Write `state` as a safetensors file, one tensor at a time: the header from `state.layout`, then each
    tensor's bytes as it is made, so that no more than one whole tensor is in memory. Files load like
    `write_safetensors`' (the same format; the tensors in layout order)."""
    header, offset = {}, 0
    for name, dtype, shape in state.layout:
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: cannot write a {dtype} tensor into a model folder")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # (the data starts 8-byte aligned, as safetensors writes it)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for (name, tensor), (_, dtype, shape) in zip(state, state.layout):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(f"{name}: made as {tensor.dtype} {tuple(tensor.shape)}, but its layout says "
                                      f"{dtype} {tuple(shape)}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_torch_file(obj, path) -> None:
    """`torch.save`, whose failed writes (a full disk) are raised as OSErrors (torch raises a RuntimeError)."""
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        raise OSError(f"could not write {path} (a full disk or quota?): {err}") from err


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model_folder(model, path, state: dict | None = None) -> None:
    """Write a model folder; `state` replaces `model.state_dict()` (e.g. gathered from a sharded model, or a
    `StreamedState` that makes each tensor as the file reaches it).

    A new folder appears whole (written beside it, then one rename). An existing folder is replaced as one
    unit (`model_folder_writer`): the model's three files all change at once, and everything else in it (a
    README, logs, other runs) is kept."""
    path = user_path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a model folder at {str(path)!r}: it is a file; give a folder path")
    config = {"model_type": "fusion", **model.config.to_dict(), "preprocessing": model.processor.to_dict(),
              "special_tokens": {"bos": model.tokenizer.bos_id, "pad": model.tokenizer.pad_id,
                                 "patch": model.tokenizer.patch_id, "stop": list(model.tokenizer.stop_ids)}}
    with model_folder_writer(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        metadata = {"format": "pt", "fusion_format_version": str(FORMAT_VERSION)}
        if isinstance(state, StreamedState):
            write_safetensors_streamed(state, tmp / WEIGHTS_FILE, metadata=metadata)
        else:
            write_safetensors(state if state is not None else model_state(model), tmp / WEIGHTS_FILE,
                              metadata=metadata)
        model.tokenizer.save(tmp / TOKENIZER_FILE)


def read_model_config(path) -> dict:
    folder = Path(path)
    if folder.is_file():
        inside = folder.name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
        raise CheckpointError(f"{str(folder)!r} is a file, not a model folder: " + (
            f"pass the folder that holds it, {str(folder.parent)!r}" if inside else
            "pass a folder written by FusionModel.save_pretrained or `fusion train`"))
    if not folder.is_dir():
        aside = sorted(folder.parent.glob(f".{glob.escape(folder.name)}{MOVED_ASIDE_MARK}*")) if folder.name else []
        raise CheckpointError(f"model folder {str(folder)!r} does not exist (expected a folder written by "
                              f"FusionModel.save_pretrained or `fusion train`)" + (
                                  f"; a save into it was cut short, and its earlier content is in {aside[-1]}: "
                                  f"rename that folder back" if aside else ""))
    config = _check_model_type(folder)  # (another library's model is named as such before its missing files)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"model folder {str(folder)!r} is incomplete: {', '.join(missing)} missing"
                              + _model_inside(folder))
    return config


def _check_model_type(folder: Path) -> dict | None:
    """The config of `folder` (None where it has no config file), CheckpointError where it is not JSON or is
    another library's model (a Hugging Face Llama 4 folder, told before the files a fusion folder has and it
    lacks)."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a model config (a JSON object)")
    if config.get("model_type", "fusion") != "fusion":
        llama4 = str(config.get("model_type", "")).startswith("llama4")
        raise CheckpointError(f"{folder} holds a {config.get('model_type')!r} model, not a fusion model" + (
            ": a Hugging Face Llama 4 folder; load its text decoder with fusion.Decoder.from_hf(folder), or train "
            "a fusion model on it with `model: {trunk: FOLDER}` in a training config" if llama4 else ""))
    return config


def _model_inside(folder: Path) -> str:
    """Where the model is when `folder` is a run folder of `fusion train` or one of its checkpoints (else "")."""
    if (folder / "final" / CONFIG_FILE).is_file():
        return f"; it is a training run's folder: its final model is {str(folder / 'final')!r}"
    if (folder / "model" / CONFIG_FILE).is_file():
        return f"; it is a training checkpoint: its model is {str(folder / 'model')!r}"
    checkpoints = sorted((folder / "checkpoints").glob("step-*/model"))
    if checkpoints:
        return (f"; it is a training run's folder without a final model yet: its latest checkpoint's model is "
                f"{str(checkpoints[-1])!r}")
    return ""


def check_model_folder(path) -> dict:
    """`read_model_config`, with the tokenizer and the header of the weights file read too (not the tensors, so
    it is quick): a folder cut short (a half-copied or half-written one) fails here, naming the file."""
    folder = Path(path)
    config = read_model_config(folder)
    _read_tokenizer(folder)
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            weights.keys()
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(_damaged_weights(folder, err)) from err
    return config


def _read_tokenizer(folder: Path) -> FusionTokenizer:
    try:
        return FusionTokenizer.load(folder / TOKENIZER_FILE)
    except TokenizerError as err:
        raise CheckpointError(f"{folder / TOKENIZER_FILE} cannot be used: {err}") from err


def _damaged_weights(folder: Path, err: Exception) -> str:
    return f"{folder / WEIGHTS_FILE} cannot be read ({err}); the file is damaged"


def load_model_folder(path, device=None, dtype: torch.dtype | None = None, read_weights: bool = True):
    """`FusionModel.from_pretrained`. The model is built on the meta device (`FusionModel.unallocated`), every
    tensor it needs is checked to be in the weights file with the shape its config gives, and the weights are
    then read into it one tensor at a time (`read_model_weights`), so loading takes no more memory than the
    loaded model and one tensor. `read_weights=False`: nothing is read and the model stays on the meta device,
    in float32, for `read_model_weights` to copy its tensors in once it is sharded (FSDP2) and allocated."""
    from .model import FusionModel

    folder = model_folder(path)  # "default": the model that ships with fusion, as everywhere a folder is named
    saved = read_model_config(folder)
    preprocessing = saved.get("preprocessing")
    settings = {k: v for k, v in saved.items() if k not in ("model_type", "preprocessing", "special_tokens")}
    try:
        config = FusionConfig.from_dict(settings)
    except (ValueError, TypeError, KeyError) as err:  # a key this version does not know, a value out of range
        raise CheckpointError(f"{folder / CONFIG_FILE} cannot be used: {err}") from err
    tokenizer = _read_tokenizer(folder)
    _check_tokenizer_fits(folder, saved.get("special_tokens"), (preprocessing or {}).get("chat_format"), tokenizer)
    try:
        model = FusionModel.unallocated(config, tokenizer)
    except ValueError as err:  # a config that does not fit its tokenizer (e.g. a smaller vocabulary)
        raise CheckpointError(f"{folder / CONFIG_FILE} does not fit {folder / TOKENIZER_FILE}: {err}") from err
    _check_weights_fit(folder, model)
    if preprocessing is not None:  # the saved preprocessing is the truth, whatever library defaults are now
        built = (model.processor.tokens_per_tile, model.vision.image_size)  # what the tower and adapter give
        try:
            model.processor = FusionProcessor(tokenizer, ImageProcessor.from_dict(preprocessing["image_processor"]),
                                              preprocessing["tokens_per_tile"], VideoSettings(**preprocessing["video"]))
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{folder / CONFIG_FILE}: its preprocessing settings cannot be used "
                                  f"({type(err).__name__}: {err})") from err
        if (model.processor.tokens_per_tile, model.processor.image_processor.image_size) != built:
            raise CheckpointError(
                f"{folder / CONFIG_FILE}: its preprocessing (tokens_per_tile {model.processor.tokens_per_tile}, "
                f"image_size {model.processor.image_processor.image_size}) does not fit its vision encoder and "
                f"adapter ({built[0]} tokens per tile of {built[1]} px); the file was edited or written for "
                f"another model")
    if not read_weights:
        return model.eval()
    model.allocate(device or "cpu")  # (the experts' bias is then read with the weights)
    if dtype is not None:
        model.to(dtype)
    read_model_weights(folder, model)
    return model.eval()


def _check_tokenizer_fits(folder: Path, special: dict | None, chat_format: str | None, tokenizer) -> None:
    """CheckpointError where the folder's tokenizer has other special-token ids than the model was saved with
    (`special_tokens` of its config: the files of two folders mixed), or its config names a chat format this
    version does not know. A config without them (written before they were) is taken as it is."""
    if chat_format is not None and chat_format != CHAT_FORMAT:
        raise CheckpointError(f"{folder / CONFIG_FILE}: the model was saved with the chat format {chat_format!r}, "
                              f"which this version of fusion does not know (it knows {CHAT_FORMAT!r}); update "
                              f"fusion to load it")
    if not isinstance(special, dict):
        return
    have = {"bos": tokenizer.bos_id, "pad": tokenizer.pad_id, "patch": tokenizer.patch_id,
            "stop": sorted(tokenizer.stop_ids)}
    differ = {key: (special[key], have[key]) for key in have if key in special and
              (sorted(special[key]) if isinstance(special[key], list) else special[key]) != have[key]}
    if differ:
        shown = ", ".join(f"{key} {saved} in {CONFIG_FILE} but {ids} in {TOKENIZER_FILE}"
                          for key, (saved, ids) in differ.items())
        raise CheckpointError(f"{folder / TOKENIZER_FILE} is not the tokenizer the model was saved with (special "
                              f"token ids: {shown}); the folder mixes the files of two models: copy all three files "
                              f"of one model folder")


def _shape_error(folder: Path, name: str, got: tuple, want: tuple) -> str:
    return (f"{folder / WEIGHTS_FILE}: {name} has shape {got} but {folder / CONFIG_FILE} gives {want}; the weights "
            f"and config differ")


def _check_weights_fit(folder: Path, model) -> None:
    """CheckpointError unless the weights file of `folder` holds exactly the tensors of `model` (built from the
    folder's config), each of its shape; only the file's index is read."""
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(_damaged_weights(folder, err)) from err
    wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = [name for name in wanted if name not in shapes]
    unexpected = [name for name in shapes if name not in wanted]
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match its config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for name, shape in shapes.items():
        if shape != wanted[name]:
            raise CheckpointError(_shape_error(folder, name, shape, wanted[name]))


def read_model_weights(path, model) -> None:
    """Copy every tensor of the model folder `path` (the weights of its tower, adapter and decoder, its experts'
    balancing bias) into `model`, plain or sharded by FSDP2 (each process then keeps its part), one tensor at
    a time."""
    from .distributed import copy_whole_tensors

    folder = model_folder(path)
    targets = model.state_dict()
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            copy_whole_tensors(targets, list(targets), weights.get_tensor,
                               lambda name, got, want: _shape_error(folder, name, got, want))
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(_damaged_weights(folder, err)) from err
