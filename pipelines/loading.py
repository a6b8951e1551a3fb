"""Where a pipeline's model comes from, and where it runs: `model=`, `device=` and `dtype=`.

    model   None or "default" (the default model shipped in `fusion/default_model/`), a checkpoint folder
            (str or os.PathLike, as written by `FusionModel.save_pretrained` or `fusion train`),
            or a `FusionModel`
    device  None (a loaded model goes to the CPU, a given FusionModel stays where it is),
            an int (-1 = CPU, 0 = cuda:0, 1 = cuda:1, ...), a string ("cpu", "cuda:1") or a torch.device
    dtype   None (a loaded model in float32, a given FusionModel as it is), a floating torch.dtype, or its
            name ("float32", "bfloat16", "float16", also "fp32", "bf16", "fp16", "torch.bfloat16")
"""
from __future__ import annotations

import importlib.resources
import operator
import os

import torch

from fusion import FusionModel
from fusion.checkpoint import DEFAULT_MODEL, default_model_location, warn_of_a_folder_called_default
from fusion.errors import CheckpointError

from .errors import DefaultModelMissingError, PipelineInputError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def resolve_device(device) -> torch.device | None:
    """`device=` as a torch.device (None stays None). Raises PipelineInputError for anything unusable."""
    if device is None or isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        try:
            resolved = torch.device(device.strip())
        except RuntimeError as err:
            raise PipelineInputError(f"device={device!r} is not a device name; use e.g. 'cpu', 'cuda', 'cuda:1', "
                                     f"an int (-1 = CPU, 0 = cuda:0) or a torch.device") from err
    elif isinstance(device, bool):  # an int to Python, never meant as one here
        raise PipelineInputError(f"device={device!r}: pass an int (-1 = CPU, 0 = cuda:0), a string or a torch.device")
    else:
        try:
            index = operator.index(device)
        except TypeError:
            raise PipelineInputError(f"device must be an int (-1 = CPU, 0 = cuda:0), a string such as 'cuda:0' or a "
                                     f"torch.device, got a {type(device).__name__}") from None
        if index < -1:
            raise PipelineInputError(f"device={index}: use -1 for the CPU or a GPU index 0, 1, ...")
        resolved = torch.device("cpu") if index == -1 else torch.device("cuda", index)
    if resolved is not None and resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineInputError(f"device={device!r} asks for a CUDA GPU, but torch sees none here; "
                                     f"use device=-1 (or 'cpu') to run on the CPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PipelineInputError(f"device={device!r}: there is no cuda:{resolved.index}, this machine has "
                                     f"{torch.cuda.device_count()} GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return resolved


def resolve_dtype(dtype) -> torch.dtype | None:
    """`dtype=` as a floating torch.dtype (None stays None). Raises PipelineInputError otherwise."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name not in _DTYPES:
            raise PipelineInputError(f"dtype={dtype!r} is not a dtype name; use one of "
                                     f"{', '.join(repr(n) for n in _DTYPES)} or a torch dtype")
        return _DTYPES[name]
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise PipelineInputError(f"dtype={dtype} is not a floating point type; use torch.float32, "
                                     f"torch.bfloat16 or torch.float16")
        return dtype
    raise PipelineInputError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got a {type(dtype).__name__}")


def load_default_model(device: torch.device | None = None, dtype: torch.dtype | None = None) -> FusionModel:
    """The model that ships with the package; DefaultModelMissingError where this install has none."""
    location = default_model_location()
    if not location.is_dir():
        raise DefaultModelMissingError(
            f"the default model is missing from this install of fusion: there is no folder {str(location)!r}. "
            f"Pass a model explicitly: model='path/to/checkpoint' (a folder written by FusionModel.save_pretrained "
            f"or `fusion train`), or model=<a FusionModel>, e.g. fusion.pipeline('vqa', model='runs/shapes/final')")
    with importlib.resources.as_file(location) as folder:
        return FusionModel.from_pretrained(folder, device=device, dtype=dtype)


def load_model(model, device: torch.device | None = None, dtype: torch.dtype | None = None) -> FusionModel:
    """The pipeline's model from `model=`, on `device` in `dtype`; a model loaded here is in eval mode.

    A given `FusionModel` is moved (in place, as `nn.Module.to` does) only where device or dtype is given,
    and keeps its train/eval mode (a pipeline call runs it in eval mode and gives it its modes back).
    A missing or broken folder raises `fusion.errors.CheckpointError` naming it.
    """
    if model is None or (isinstance(model, str) and model == DEFAULT_MODEL):  # a folder called so is "./default"
        if model is not None:
            warn_of_a_folder_called_default()
        return load_default_model(device, dtype)  # from_pretrained: in eval mode
    if isinstance(model, FusionModel):
        if dtype is not None:
            model.to(dtype)
        if device is not None:
            model.to(device)
        return model
    if isinstance(model, (str, os.PathLike)):
        if os.path.isfile(os.path.expanduser(model)):
            raise CheckpointError(
                f"model={os.fspath(model)!r} is a file, not a model folder: model= takes a folder written by "
                f"FusionModel.save_pretrained or `fusion train` (or a FusionModel, or None for the default model). "
                f"The image or video goes to the pipeline's call: pipe(...) after pipe = fusion.pipeline(task)")
        return FusionModel.from_pretrained(model, device=device, dtype=dtype)
    raise PipelineInputError(f"model must be a checkpoint folder (str or os.PathLike), a fusion.FusionModel, "
                             f"or None for the default model, got a {type(model).__name__}; the images or "
                             f"videos go to the pipeline's call: pipe(...) after pipe = fusion.pipeline(task)")
