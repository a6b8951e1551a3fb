"""What `max_row_tokens` saves per training step of the default model's recipe on a CPU.

A grouped sample (one image, many questions as branches of a shared prefix) can be hundreds of tokens
long: the recipe's last stage adds up to 31 questions per image. One such row pads every row of its
length bucket to its length, and its attention scores grow with the square of that length, although
each question sees only the prefix and itself. `max_row_tokens: N` computes such a sample as several
rows of at most N tokens, each with the prefix (`fusion.data.collate.split_branches`): the same loss.

One step = forward, backward and AdamW on 32 samples drawn like the recipe's last stage draws them
(`bench/compiled_step.py`'s batches), the decoder blocks compiled as the recipe compiles them, under
bf16 autocast where the CPU computes bf16 natively, else in float32. The ways alternate in every round
on the very same batches and model, so machine noise hits all alike:

    buckets2        length_buckets: 2 (the recipe before max_row_tokens)
    buckets3        length_buckets: 3
    rows224         max_row_tokens: 224, length_buckets: 2
    rows224-b3      max_row_tokens: 224, length_buckets: 3
    pack512         pack: true, max_length: 512 (the samples in order, as many as fit, in rows of 512 tokens,
                    each attending to itself only)

Besides the seconds it reports the tokens each way computes per step (padding included) and the
attention scores (rows x length^2, summed over buckets).

    python bench/row_split.py                 # 7 rounds; medians and the speed-ups against buckets2
                                              # (per round on the same batch, and of the medians)
    python bench/row_split.py --rounds 9 --json out.json
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
from compiled_step import dynamo_compiles, last_stage_batches  # noqa: E402
from recipe_step import recipe_bench_arguments, recipe_bench_setup, recipe_train_step, report  # noqa: E402
from rounds import round_order  # noqa: E402

from fusion.compilation import check_can_compile, compile_decoder_blocks  # noqa: E402
from fusion.data.collate import split_by_length, split_long_samples  # noqa: E402
from fusion.data.stage_data import collate_samples  # noqa: E402
from fusion.precision import computed_in, cpu_has_native_bf16  # noqa: E402

# way: (max_row_tokens, length_buckets, packed row length)
WAYS = {"buckets2": (None, 2, None), "buckets3": (None, 3, None), "rows224": (224, 2, None),
        "rows224-b3": (224, 3, None), "pack512": (None, 1, 512)}


def plan(samples, patch_id: int, max_row_tokens: int | None, buckets: int,
         pack_length: int | None = None) -> list[list]:
    """The micro-batches one optimizer step computes, as the trainer plans them (packing: one)."""
    rows = samples if max_row_tokens is None else split_long_samples(samples, max_row_tokens, patch_id)
    return [rows] if pack_length else split_by_length(rows, buckets)


def computed(groups: list[list], pad_id: int, pack_length: int | None) -> tuple[int, int]:
    """(tokens computed, padding included; attention scores per head and layer) of one step."""
    batches = [collate_samples(g, pad_id, pack_length is not None, pack_length or 1024) for g in groups]
    widths = [tuple(b.input_ids.shape) for b in batches]
    return sum(n * w for n, w in widths), sum(n * w * w for n, w in widths)


def parse_arguments(argv=None) -> argparse.Namespace:
    return recipe_bench_arguments(__doc__, argv)


def main(argv=None):
    args = parse_arguments(argv)
    model = recipe_bench_setup(args)
    check_can_compile(torch.device("cpu"), "bench/row_split.py")
    bf16 = cpu_has_native_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        batches = last_stage_batches(model, args.model, tmp, args.batch_size, args.rounds + 2)
    train_step = recipe_train_step(model, bf16=bf16)
    compile_decoder_blocks(model.decoder)
    plans = {way: [plan(b, model.patch_id, *setting) for b in batches] for way, setting in WAYS.items()}
    packed = {way: setting[2] for way, setting in WAYS.items()}
    for way in WAYS:  # compiles; every way's shapes seen before timing
        train_step(plans[way][0], packed[way])
        train_step(plans[way][1], packed[way])
    times = {way: [] for way in WAYS}
    names = list(WAYS)
    compiles_before = dynamo_compiles()
    for r in range(args.rounds):
        for way in round_order(names, r):
            times[way].append(train_step(plans[way][r + 2], packed[way]))
    compiles_during_timed_rounds = dynamo_compiles() - compiles_before
    median = {way: statistics.median(t) for way, t in times.items()}
    pad = model.processor.tokenizer.pad_id
    work = {way: [computed(p, pad, packed[way]) for p in plans[way][2:]] for way in WAYS}
    return report(args, {
        "computed_in": computed_in(bf16),
        "dynamo_compiles_during_timed_rounds": compiles_during_timed_rounds,  # 0: no timed step compiled
        "median_step_s": {w: round(m, 3) for w, m in median.items()},
        "speedup_vs_buckets2": {w: round(median["buckets2"] / m, 2) for w, m in median.items()},
        "median_paired_speedup_vs_buckets2": {  # per round, the same batch: the steadier figure
            w: round(statistics.median(b / x for b, x in zip(times["buckets2"], t)), 2) for w, t in times.items()},
        "mean_tokens_per_step": {w: round(statistics.mean(t for t, _ in c)) for w, c in work.items()},
        "mean_attention_scores_per_step": {w: round(statistics.mean(a for _, a in c)) for w, c in work.items()},
        "all_step_s": {w: [round(x, 3) for x in t] for w, t in times.items()},
    })


if __name__ == "__main__":
    main()
