"""Whether a device computes bfloat16 natively, so that bf16 autocast pays off there.

On a GPU with bf16 support, and on a CPU with AVX512-BF16 or AMX, bf16 matmuls are faster than float32
ones (a compiled step of the default recipe's last stage took 0.882 s under bf16 autocast and 1.247 s in float32
on a 2-core CPU with AVX512-BF16: two separate runs, `bench/compiled_step.py` and `bench/compiled_step.py --fp32`,
BENCHMARKS.md). On a CPU without them (e.g. AVX2 only)
torch emulates bf16 and matmuls are many times slower than in float32. `precision: auto` uses bf16 only where
it is native.
"""
from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True where this CPU has AVX512-BF16 or AMX (torch's fast bf16 paths); False where unknown."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # a private torch helper; a failing check only means "not known to be fast"
            continue
    return False


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast on `device` runs on native bf16 hardware."""
    if device.type == "cuda":  # compute capability 8.0 (Ampere) or later; older GPUs only emulate bf16
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no `including_emulation` and counts native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def computed_in(bf16_autocast: bool) -> str:
    """How a run or bench says what it computes in."""
    return "bf16 autocast" if bf16_autocast else "float32"
