"""Which `scaled_dot_product_attention` backend is fastest for the default model's training attention on a CPU?

`fusion.attention.attend` leaves the choice to torch, which on a CPU picks its flash kernel. This measures
forward and backward of one attention layer with the default model's heads (8 query, 2 key-value heads of
32, `enable_gqa`) and a boolean causal mask (as the decoder passes one), at micro-batch shapes the recipe's
stages compute (rows x tokens), under three ways, alternating in every round (the order flipped every round)
on the same tensors:

    flash-fp32  torch's CPU flash kernel, float32 (what `attend` runs, also under bf16 autocast)
    math-fp32   the reference path (scores materialised, softmax, matmul), float32
    math-bf16   the reference path in bf16

The largest difference between the flash and math outputs is reported too. On the project's 2-core CPU the
flash kernel is the fastest at every shape (BENCHMARKS.md).

    python bench/attention_backends.py                 # 9 rounds; medians and ratios against flash-fp32
    python bench/attention_backends.py --rounds 15 --json out.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from arguments import bench_parser, print_results
from rounds import round_order

WAYS = {"flash-fp32": (SDPBackend.FLASH_ATTENTION, torch.float32),
        "math-fp32": (SDPBackend.MATH, torch.float32),
        "math-bf16": (SDPBackend.MATH, torch.bfloat16)}
# (rows, tokens) of micro-batches as the recipe's stages pad them: image groups (~140 tokens), video groups
# (~200), and the last stage's rows of at most 224 tokens
SHAPES = ((21, 140), (32, 200), (16, 224))
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32


def attention_pass(q, k, v, mask, grad_out, way: str) -> tuple[float, torch.Tensor]:
    """Seconds for forward + backward under `way`, and the output. The inputs and the output's gradient are
    cast to the way's dtype before the clock starts."""
    backend, dtype = WAYS[way]
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    grad_out = grad_out.to(dtype)
    start = time.perf_counter()
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(grad_out)
    return time.perf_counter() - start, out.detach().float()


def measure(rows: int, tokens: int, rounds: int, warmup: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, HEADS, tokens, HEAD_DIM, generator=g)
    k, v = (torch.randn(rows, KV_HEADS, tokens, HEAD_DIM, generator=g) for _ in range(2))
    grad_out = torch.randn(rows, HEADS, tokens, HEAD_DIM, generator=g)
    pos = torch.arange(tokens)
    mask = (pos[None, :] <= pos[:, None])[None, None].expand(rows, 1, tokens, tokens)
    times = {way: [] for way in WAYS}
    outputs = {}
    for r in range(warmup + rounds):
        for way in round_order(list(WAYS), r):
            seconds, outputs[way] = attention_pass(q, k, v, mask, grad_out, way)
            if r >= warmup:
                times[way].append(seconds)
    medians = {way: statistics.median(t) for way, t in times.items()}
    base = medians["flash-fp32"]
    return {"rows": rows, "tokens": tokens,
            "median_ms": {way: round(1e3 * m, 2) for way, m in medians.items()},
            "speed_vs_flash": {way: round(base / m, 2) for way, m in medians.items()},
            "max_abs_diff_math_fp32": float((outputs["flash-fp32"] - outputs["math-fp32"]).abs().max())}


def parse_arguments(argv=None) -> argparse.Namespace:
    return bench_parser(__doc__, rounds=9).parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
              "shapes": [measure(rows, tokens, args.rounds) for rows, tokens in SHAPES]}
    return print_results(result, args.json)


if __name__ == "__main__":
    main()
