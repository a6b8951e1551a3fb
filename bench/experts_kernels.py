"""Which way of running the experts is faster on this machine: the loop or the grouped matmuls?

`fusion.moe.GroupedExperts` runs its experts as one grouped matmul (`fusion::grouped_experts`,
`torch._grouped_mm` over rows padded per expert) where a GPU has it (CUDA, compute capability 9.0+, bf16), else
as a loop of one matmul per expert (`fusion::looped_experts`). torch also runs `torch._grouped_mm` on a CPU, so
both can be timed here: forward and backward of the experts of the default model's MoE layers (4 experts,
hidden size 256, FFN 256) on rows grouped by expert as a micro-batch of the recipe routes them, two ways,
alternating in every round (the order flipped every round) on the same tensors:

    loop      `GroupedExperts._forward_loop` (what a CPU runs)
    grouped   `GroupedExperts._forward_grouped_mm`

The largest difference between the two ways' outputs is reported too.

    python bench/experts_kernels.py                 # 9 rounds; medians and the loop's speed against grouped
    python bench/experts_kernels.py --rounds 15 --json out.json
    python bench/experts_kernels.py --bf16          # the experts computing in bf16 (autocast, as training does)
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from arguments import bench_parser, print_results
from rounds import round_order

from fusion.moe import GroupedExperts

WAYS = {"loop": "_forward_loop", "grouped": "_forward_grouped_mm"}
EXPERTS, DIM, HIDDEN = 4, 256, 256
# rows per expert: a micro-batch of the last stage (~32 rows of ~200 tokens, top-1 of 4 experts), and a smaller one
COUNTS = ((1700, 1500, 1800, 1400), (600, 400, 700, 300))


def experts_pass(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, way: str, bf16: bool):
    """Seconds for forward + backward of the experts under `way`, and the output."""
    rows = x.detach().clone().requires_grad_()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = getattr(experts, WAYS[way])(rows, counts)
    out.float().sum().backward()
    return time.perf_counter() - start, out.detach().float()


def measure(counts: tuple[int, ...], rounds: int, bf16: bool, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    experts = GroupedExperts(EXPERTS, DIM, HIDDEN)
    for weight in (experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(weight, std=0.02)
    x = torch.randn(sum(counts), DIM)
    counts = torch.tensor(counts)
    times = {way: [] for way in WAYS}
    outputs = {}
    for r in range(warmup + rounds):
        for way in round_order(list(WAYS), r):
            experts.zero_grad()
            seconds, outputs[way] = experts_pass(experts, x, counts, way, bf16)
            if r >= warmup:
                times[way].append(seconds)
    medians = {way: statistics.median(t) for way, t in times.items()}
    return {"rows_per_expert": counts.tolist(),
            "median_ms": {way: round(1e3 * m, 2) for way, m in medians.items()},
            "loop_speed_vs_grouped": round(medians["grouped"] / medians["loop"], 2),
            "max_abs_diff": float((outputs["loop"] - outputs["grouped"]).abs().max())}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = bench_parser(__doc__, rounds=9)
    parser.add_argument("--bf16", action="store_true", help="the experts computing in bf16 under autocast")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    if not hasattr(torch, "_grouped_mm"):
        raise SystemExit("this torch has no torch._grouped_mm: there is nothing to compare the loop with")
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
              "computed_in": "bf16" if args.bf16 else "float32",
              "shapes": [measure(counts, args.rounds, args.bf16) for counts in COUNTS]}
    return print_results(result, args.json)


if __name__ == "__main__":
    main()
