"""What `compile: true` saves per training step of the default model's recipe on a CPU.

One step = forward, backward and AdamW on 32 shared-prefix samples drawn like the recipe's last stage draws
them (a small shapes world with the recipe's settings: `train.jsonl`, `train_extra.jsonl` and the clips
once more), everything trainable, `length_buckets: 2`, under bf16 autocast where the CPU computes bf16
natively, else in float32 (as `precision: auto` trains). Two ways alternate in every round on the very same
batches and the very same model, so machine noise hits both alike:

    eager      the decoder blocks as written (`fusion.compilation.eager()`)
    compiled   the decoder blocks through torch.compile (`fusion.compilation.compile_decoder_blocks`)

The first compiled steps compile (their seconds are reported as `compile_s`, not timed as steps).

    python bench/compiled_step.py                    # 7 rounds; medians and the speed-up
    python bench/compiled_step.py --rounds 3 --json out.json
    python bench/compiled_step.py --fp32             # float32 even on a CPU with native bf16
    python bench/compiled_step.py --profile          # also where each way's time goes, by op
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arguments import draw_batches  # noqa: E402
from recipe_step import recipe_bench_arguments, recipe_bench_setup, recipe_train_step, recipe_world, report  # noqa: E402
from rounds import round_order  # noqa: E402

from fusion.compilation import check_can_compile, compile_decoder_blocks, eager  # noqa: E402
from fusion.data.collate import split_by_length  # noqa: E402
from fusion.data.datasets import ConversationDataset, MediaCache  # noqa: E402
from fusion.precision import computed_in, cpu_has_native_bf16  # noqa: E402

WAYS = ("eager", "compiled")


def last_stage_batches(model, model_dir: str, tmp: str, batch_size: int, count: int) -> list[list]:
    """`count` batches drawn from a small world's train.jsonl, train_extra.jsonl and its clips again
    (120 off-grid images for 160 training images, as the recipe has 3000 for 4000)."""
    train = recipe_world(model_dir, tmp, train_extra_offgrid_images=120)
    cache = MediaCache()
    files = [ConversationDataset(train, model.processor, group_by_media=True, media_cache=cache),
             ConversationDataset(os.path.join(tmp, "train_extra.jsonl"), model.processor, group_by_media=True,
                                 media_cache=cache)]
    pool = [(f, i) for f in files for i in range(len(f))]
    pool += [(files[0], i) for i in range(len(files[0])) if files[0].records[i].videos]  # the clips twice
    return [[f[i] for f, i in draw] for draw in
            draw_batches(pool, batch_size, count, "samples of train.jsonl, train_extra.jsonl and the clips again")]


def dynamo_compiles() -> int:
    """How many frames torch.compile has compiled (first compiles and recompiles) in this process so far: taken
    before and after the timed rounds, a difference above 0 means some timed step included compiling."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def parse_arguments(argv=None) -> argparse.Namespace:
    def add_arguments(parser):
        parser.add_argument("--fp32", action="store_true", help="float32 even where the CPU computes bf16 natively")
        parser.add_argument("--profile", action="store_true",
                            help="also profile 3 steps of each way and print each one's share of the time by op")

    return recipe_bench_arguments(__doc__, argv, add_arguments)


def main(argv=None):
    args = parse_arguments(argv)
    model = recipe_bench_setup(args)
    check_can_compile(torch.device("cpu"), "bench/compiled_step.py")
    bf16 = cpu_has_native_bf16() and not args.fp32
    with tempfile.TemporaryDirectory() as tmp:
        batches = last_stage_batches(model, args.model, tmp, args.batch_size, args.rounds + 2)
    train_step = recipe_train_step(model, bf16=bf16)
    compile_decoder_blocks(model.decoder)

    def run(samples, way):
        with eager(way == "eager"):
            return train_step(split_by_length(samples, 2))

    run(batches[0], "eager")  # warm-up
    compile_s = run(batches[0], "compiled") + run(batches[1], "compiled")  # compiles (a second shape, dynamic)
    times = {way: [] for way in WAYS}
    compiles_before = dynamo_compiles()
    for r in range(args.rounds):
        for way in round_order(WAYS, r):
            times[way].append(run(batches[r + 2], way))
    compiles_during_timed_rounds = dynamo_compiles() - compiles_before
    median = {way: statistics.median(t) for way, t in times.items()}
    shares = {way: profile_shares(lambda: [run(b, way) for b in batches[2:5]]) for way in WAYS} if args.profile else {}
    paired = [e / c for e, c in zip(times["eager"], times["compiled"])]
    return report(args, {
        "computed_in": computed_in(bf16),
        "compile_s": round(compile_s, 1),
        "dynamo_compiles_during_timed_rounds": compiles_during_timed_rounds,  # 0: no timed step compiled
        "median_step_s": {w: round(m, 3) for w, m in median.items()},
        "speedup": round(median["eager"] / median["compiled"], 2),
        "median_paired_speedup": round(statistics.median(paired), 2),
        "all_step_s": {w: [round(x, 3) for x in t] for w, t in times.items()},
        **({"profile_top_ops_percent": shares} if shares else {}),
    })


def profile_shares(fn, top: int = 8) -> dict:
    """{op: percent of the profiled CPU time spent in it (self time)} for the `top` ops, while `fn()` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return {e.key[:60]: round(100 * e.self_cpu_time_total / total, 1) for e in events[:top]}


if __name__ == "__main__":
    main()
