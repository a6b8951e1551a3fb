"""PyTorch's own distributed stack, applied from outside the model: `torchrun` sets the environment,
DDP or FSDP2 (`fully_shard` per block) wraps the model, `torch.distributed.checkpoint.state_dict`
gathers full model state dicts, and `torch.distributed.checkpoint` writes and reads the optimizer's state
each process its part. One process without torchrun is the plain case of the same code.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import CheckpointError, ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes, on `value`'s own device (reduced on this process's device: NCCL reduces
        CUDA tensors only)."""
        if self.distributed:
            reduced = value.to(self.device, copy=True)
            dist.all_reduce(reduced)
            value = reduced.to(value.device)
        return value

    def broadcast_object(self, value):
        """The main process's `value` (any picklable object) on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_done(self, done: bool) -> bool:
        """True when every process's `done` is (for `generate(stop_together=...)`)."""
        return not self.all_reduce_max(int(not done))

    def all_gather_objects(self, value) -> list:
        """Every process's `value` (any picklable object), in process order, on every process."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def all_reduce_max(self, value: int) -> int:
        """The largest of each process's `value`."""
        if not self.distributed:
            return value
        reduced = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return int(reduced.item())


DEVICES = "cpu, cuda or cuda:N (N: a CUDA device index)"
_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def parse_device(text: str | None, where: str = "device") -> torch.device:
    """The torch device that `text` names, checked against this machine before anything is loaded.

    `text`: "cpu", "cuda" or "cuda:N"; None: cuda if available, else cpu. `where` names the input in the
    error (e.g. "device" for the training config, "--device" for `fusion eval`).

    Raises `ConfigError` for any other text (e.g. "gpu", "mps"), and for cuda / cuda:N where no CUDA device
    is available or there is no device N.
    """
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = _DEVICE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if found is None or (found[1] == "cpu" and found[2] is not None):
        raise ConfigError(f"{where}: unknown device {text!r}; use {DEVICES}, or leave it unset for cuda where "
                          f"available, else cpu")
    if found[1] == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{where} is {text!r} but no CUDA device is available (torch.cuda.is_available() is "
                          f"False); use cpu")
    if found[2] is None:
        return torch.device("cuda")
    index, count = int(found[2]), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{where} is {text!r} but this machine has {count} CUDA device{'s' if count != 1 else ''} "
                          f"(cuda:0 to cuda:{count - 1}); choose one of them, or cuda")
    return torch.device("cuda", index)


def init_distributed(device: str | None = None) -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl on CUDA.

    `device`: as `parse_device` (None: cuda if available, else cpu; anything else raises `ConfigError`).
    Without torchrun, "cuda:N" uses device N and "cuda" device 0. Under torchrun (LOCAL_RANK set) every CUDA
    process uses cuda:LOCAL_RANK, whatever index `device` names: torchrun gives each process its own device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = parse_device(device, "device")
    use_cuda = chosen.type == "cuda"
    if use_cuda:
        if "LOCAL_RANK" in os.environ or chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world_size, local_rank, chosen)


def shutdown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_torchrun_process(code: int) -> None:
    """Under torchrun (WORLD_SIZE > 1), end this process now with exit status `code`: its output flushed, its
    logging shut down and its garbage collected, then `os._exit`, skipping the interpreter's teardown, where torch
    2.14's gloo backend now and then aborts a process whose work is done ("terminate called without an active
    exception", SIGABRT; rare and in bursts on a busy machine, BENCHMARKS.md, `bench/torchrun_exit.py`), failing a
    run that finished. Call it after the process group is destroyed (`shutdown_distributed`) and every file is
    written. Outside torchrun it returns and does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    gc.collect()  # (a file object held in a reference cycle is flushed and closed by its collection)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def apply_fsdp2(model: nn.Module, blocks: list[nn.Module], ctx: DistContext) -> nn.Module:
    """Shard each block, then the root (FSDP2). Parameters become DTensors, in place."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathering_whole_supported() -> bool:
    """Whether this torch can hold every FSDP2 module gathered through several forwards
    (`FSDPModule.set_reshard_after_forward`, torch 2.7 and later), as `gathered_for_inference(whole=True)` does."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5
        return False
    return hasattr(FSDPModule, "set_reshard_after_forward")


@contextlib.contextmanager
def gathered_for_inference(model: nn.Module, whole: bool = False):
    """An FSDP2 model (`apply_fsdp2`) ready for forwards without gradients, such as an evaluation's
    generations; its weights sharded again on leaving. Collective: every process enters and leaves it together.

    The root's own weights (embeddings, LM head, final norm) are gathered on entering and held. With `whole`,
    so are every block's, the vision tower's and the adapter's, and no forward inside gathers anything: each
    process holds the whole model for the while (its memory grows by the shards it does not hold) and runs its
    forwards without waiting on the others. Without `whole` each of those modules gathers its weights when it
    runs and frees them after, as in training: no process holds the whole model, but every forward gathers
    every block again. `whole` needs torch 2.7 or later (`gathering_whole_supported`; the training config
    checks it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import FSDPModule
    inner = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model] if whole else []
    for module in inner:  # (fully_shard's default for a module under the root: reshard after each forward)
        module.set_reshard_after_forward(False, recurse=False)
    try:
        for module in [model, *inner]:
            module.unshard()
        yield model
    finally:
        for module in [*inner, model]:
            module.reshard()
        for module in inner:
            module.set_reshard_after_forward(True, recurse=False)


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    # Every trained parameter takes part in every forward (the tower runs on a blank tile in a micro-batch
    # without media, an expert with no tokens gets a zero gradient), so DDP need not search the graph for
    # unused ones in every step (and warn that it found none)
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete (unsharded) state dict on CPU, for any of plain / DDP-wrapped / FSDP2 models.

    Collective under FSDP2: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def streamed_model_state(model: nn.Module):
    """The model's whole state dict as a `StreamedState` (for `save_model_folder`): each tensor gathered from
    the processes that hold its shards (FSDP2) when the writer reaches it, on the CPU, so that a process holds
    its shards and one whole tensor. Collective under FSDP2: every process iterates it (the main process by
    writing the file, the others by `drain()`), in the same order."""
    from torch.distributed.tensor import DTensor

    from .checkpoint import StreamedState

    state = model.state_dict()
    layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]

    def whole(name: str) -> torch.Tensor:
        tensor = state[name].detach()
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()

    return StreamedState(layout, whole)


def load_full_optimizer_state(model: nn.Module, optimizer, optimizer_state: dict) -> None:
    """Load a full optimizer state dict (as checkpoints of fusion before 2026-12-03 hold it) into the optimizer of a
    (possibly sharded) model, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=dist.is_initialized(), strict=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_optimizer_state(model: nn.Module, optimizer, folder) -> None:
    """Write the optimizer's state into `folder` with `torch.distributed.checkpoint`, each process the part it
    holds (under FSDP2 its shard of every tensor; replicated tensors once), so that no process gathers the
    whole state. Collective: every process calls it with the same folder (one folder that every process can
    reach). `load_optimizer_state` reads it into any number of processes, sharded or not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    try:
        with _one_process_quiet():
            dcp.save({"optimizer": state}, storage_writer=dcp.FileSystemWriter(str(folder)))
    except dcp.api.CheckpointException as err:  # (raised in every process when one of them failed)
        raise OSError(f"could not write the optimizer state into {folder}: {_failures(err)}") from None


def load_optimizer_state(model: nn.Module, optimizer, folder) -> None:
    """Read the optimizer state that `save_optimizer_state` wrote (by any number of processes) into `optimizer`:
    each process reads the part of each tensor it holds. Collective like the save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    state = get_optimizer_state_dict(model, optimizer)  # this process's layout, to be filled in place
    try:
        with _one_process_quiet():
            dcp.load({"optimizer": state}, storage_reader=dcp.FileSystemReader(str(folder)))
    except dcp.api.CheckpointException as err:
        raise CheckpointError(f"could not read the optimizer state in {folder}: {_failures(err)}") from None
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(strict=True))


@contextlib.contextmanager
def _one_process_quiet():
    """torch.distributed.checkpoint in one process without torch.distributed, without its warning that it
    assumes a single process (it is the plain case here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


def _failures(err) -> str:
    """What failed in which process, from a `torch.distributed.checkpoint` CheckpointException."""
    return "; ".join(f"process {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(err.failures.items()))


def check_optimizer_state(folder) -> None:
    """Raise (`CheckpointError`) unless `folder` holds a whole optimizer state as `save_optimizer_state` writes
    it: its index, and each file the index names at least as long as the parts the index places in it (a copy
    cut short fails here, before anything is loaded)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    try:
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{folder / '.metadata'}, the index of the optimizer state, cannot be read "
                              f"({type(err).__name__}: {err})") from err
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found is None or found < size:
            raise CheckpointError(f"{path}: {'missing' if found is None else f'{found} bytes'}, the index of the "
                                  f"optimizer state places {size} bytes in it (a copy cut short?)")


def this_process_part(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor `full` that `target` holds in this process: all of it for a plain tensor,
    this process's rows for an FSDP2-sharded parameter (a DTensor sharded on its first dimension, as
    `fully_shard` shards: `torch.chunk` of the rows, so the last processes may hold fewer rows or none)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(target, DTensor):
        return full
    placements = tuple(target.placements)
    if target.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(f"loading a tensor sharded as {placements} over a {target.device_mesh.ndim}-D "
                                  f"mesh; fusion shards with fully_shard on one dimension (Shard(0))")
    rows = target.to_local().shape[0]
    per_process = -(-full.shape[0] // target.device_mesh.size())  # torch.chunk's chunk size
    start = min(target.device_mesh.get_local_rank() * per_process, full.shape[0])
    return full[start:start + rows]


@torch.no_grad()
def copy_whole_tensors(targets: dict[str, torch.Tensor], names, read, shape_error) -> None:
    """Copy the tensor `read(name)` gives (whole, as a file stores it) into `targets[name]` for each of `names`,
    one at a time: an FSDP2-sharded target keeps only this process's part, so a process never holds more
    than its shard of the weights and one whole tensor. A shape other than the target's (whole) shape is a
    CheckpointError with the message `shape_error(name, shape read, shape wanted)`."""
    from torch.distributed.tensor import DTensor

    for name in names:
        value = read(name)
        target = targets[name]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(shape_error(name, tuple(value.shape), tuple(target.shape)))
        local = target.to_local() if isinstance(target, DTensor) else target
        local.copy_(this_process_part(target, value))
