"""What `cache_samples: true` saves per training step of the default model's recipe on a CPU.

A stage past its first epoch reads every sample again: without the cache, each read decodes the image
or video, resizes and normalises it and tokenizes the questions; with it, the sample comes from memory.
Each round reads the same 32 shared-prefix samples (a random batch of a small shapes world with the
recipe's settings) both ways, in alternating order, and runs one training step on them (forward,
backward, AdamW, everything trainable; under bf16 autocast where the CPU computes bf16 natively,
else in float32, as `precision: auto` trains), so machine noise hits all alike:

    read        the 32 samples read (and decoded) from the files
    cached      the same 32 samples from the cache (warmed by one pass over the data)
    step        the training step on them (the same either way)

    python bench/sample_cache.py                    # 7 rounds; medians and the step speed-up
    python bench/sample_cache.py --rounds 3 --json out.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arguments import draw_batches  # noqa: E402
from recipe_step import recipe_bench_arguments, recipe_bench_setup, recipe_train_step, recipe_world, report  # noqa: E402
from rounds import round_order  # noqa: E402

from fusion.data.collate import split_by_length  # noqa: E402
from fusion.data.datasets import ConversationDataset, MediaCache  # noqa: E402
from fusion.precision import computed_in, cpu_has_native_bf16  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def parse_arguments(argv=None) -> argparse.Namespace:
    return recipe_bench_arguments(__doc__, argv)


def main(argv=None):
    args = parse_arguments(argv)
    model = recipe_bench_setup(args)
    bf16 = cpu_has_native_bf16()
    train_step = recipe_train_step(model, bf16)
    times = {"read": [], "cached": [], "step": []}
    with tempfile.TemporaryDirectory() as tmp:
        train = recipe_world(args.model, tmp)
        plain = ConversationDataset(train, model.processor, group_by_media=True)
        cached = ConversationDataset(train, model.processor, group_by_media=True, cache=True, media_cache=MediaCache())
        draws = draw_batches(range(len(plain)), args.batch_size, args.rounds + 1, "samples of train.jsonl")
        for i in range(len(cached)):  # the first epoch fills the cache
            cached[i]
        for r, indices in enumerate(draws):  # round 0 warms up
            ways = [("read", plain), ("cached", cached)]
            for name, dataset in round_order(ways, r + 1):
                samples, seconds = timed(lambda: [dataset[i] for i in indices])  # noqa: B023
                if r:
                    times[name].append(seconds)
            seconds = train_step(split_by_length(samples, 2))
            if r:
                times["step"].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    return report(args, {
        "step_computed_in": computed_in(bf16),
        "median_s": {name: round(m, 4) for name, m in median.items()},
        "read_share_of_an_uncached_step": round(median["read"] / (median["read"] + median["step"]), 3),
        "step_speedup_with_cache": round((median["read"] + median["step"]) / (median["cached"] + median["step"]), 3),
        "all_s": {name: [round(x, 4) for x in t] for name, t in times.items()},
    })


if __name__ == "__main__":
    main()
