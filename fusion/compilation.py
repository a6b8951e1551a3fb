"""`torch.compile` for training steps: the decoder blocks compiled in place, evaluation kept eager.

A stage with `compile: true` compiles each decoder block (`nn.Module.compile`, dynamic shapes, so batches
of any length reuse one graph); the parameters and their names stay those of the eager model, so
checkpoints and `save_pretrained` are unchanged. Inductor fuses what eager mode runs as separate passes
over the activations (norms, casts, SwiGLU products, RoPE): a bf16 step of the recipe's last stage is
1.28x faster, a float32 one 1.09x (`bench/compiled_step.py`). A block's first call compiles it (a minute or two on
a small CPU), so compile only stages long enough to earn that back.

Generation and validation run eagerly (`eager()`): their shapes (one token at a time, a KV cache) would
only trigger more compilation.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil

import torch

from .errors import ConfigError

# Blocks differ (dense or MoE, RoPE or NoPE, chunked or not) and each stage may freeze other parts
# (different backward graphs): allow more cached graphs per block than dynamo's default before it
# gives up and runs eagerly.
RECOMPILE_LIMIT = 32


def check_can_compile(device: torch.device, where: str) -> None:
    """Raise a ConfigError naming `where` if `torch.compile` cannot build kernels for `device`."""
    if not hasattr(torch.compiler, "set_stance"):
        raise ConfigError(f"{where}: compile: true needs torch >= 2.6 (this is {torch.__version__}); "
                          f"upgrade torch or set compile: false")
    if device.type == "cpu" and cpu_compiler() is None:
        raise ConfigError(f"{where}: compile: true on a CPU needs a C++ compiler for inductor's kernels, and "
                          f"{cpu_compiler_name()!r} is not on PATH; install one (e.g. `apt-get install g++`, or set "
                          f"CXX) or set compile: false")


def cpu_compiler_name() -> str:
    return os.environ.get("CXX", "g++")


def cpu_compiler() -> str | None:
    """The path of the C++ compiler inductor builds CPU kernels with ($CXX, else g++), None if not on PATH. $CXX
    may be a command with arguments (`ccache g++`), as inductor reads it: its first word is looked up."""
    try:
        words = shlex.split(cpu_compiler_name())
    except ValueError:  # unbalanced quotes
        return None
    return shutil.which(words[0]) if words else None


def compile_decoder_blocks(decoder: torch.nn.Module) -> int:
    """Compile each of `decoder.layers` in place (once); returns how many were newly compiled."""
    import torch._dynamo

    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), RECOMPILE_LIMIT))
    newly = 0
    for layer in decoder.layers:
        if not is_compiled(layer):
            layer.compile(dynamic=True)
            newly += 1
    return newly


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def eager(enabled: bool = True):
    """A context in which compiled modules run their eager code (nothing is compiled or looked up)."""
    if not enabled or not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")
