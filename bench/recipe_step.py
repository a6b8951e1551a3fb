"""One training step of the default model's recipe on a CPU: what float32 attention and length buckets save.

A step = forward, backward and AdamW on 32 shared-prefix samples of a shapes world (images with their
questions and caption, videos with theirs), everything trainable, under bf16 autocast, the model built as
`examples/recipes/shapes-tiny.yaml` builds it (from `fusion/default_model/config.json`). Three ways,
alternating in every round (A, B, C, then C, B, A) on the very same batches, so machine noise hits all alike:

    old        attention in bf16 (torch's own kernels under autocast), one padded batch
    fp32-attn  attention in float32 (`fusion.attention.attend`, `vision.attention`), one padded batch
    buckets    float32 attention and `length_buckets: 2` (two padded groups of similar length)

    python bench/recipe_step.py                    # 7 rounds; medians and ratios
    python bench/recipe_step.py --rounds 3 --json out.json

It measures bf16 autocast, so it needs a CPU that computes bf16 natively (AVX512-BF16 or AMX); elsewhere
torch emulates bf16 (tens of times slower) and the bench stops with a message instead of timing that.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion.attention  # noqa: E402
from fusion.data.collate import split_by_length  # noqa: E402
from fusion.data.datasets import ConversationDataset  # noqa: E402
from fusion.data.shapes_world import ShapesWorldConfig, generate_shapes_world  # noqa: E402
from fusion.model import FusionModel  # noqa: E402
from fusion.precision import cpu_has_native_bf16  # noqa: E402
from fusion.data.stage_data import collate_samples  # noqa: E402
from fusion.training_step import TrainingStep  # noqa: E402
from arguments import bench_parser, draw_batches, positive_int, print_results  # noqa: E402
from rounds import round_order  # noqa: E402
from vision.attention import Float32CpuAttention  # noqa: E402

WAYS = ("old", "fp32-attn", "buckets")
float32_attend = fusion.attention.attend  # the library's own, kept before set_attention swaps it


def bf16_attend(q, k, v, plan, enable_gqa):
    """The attention before float32 upcasting: scaled_dot_product_attention in the autocast dtype."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.is_causal,
                                          enable_gqa=enable_gqa)


def set_attention(model: FusionModel, float32: bool):
    fusion.attention.attend = float32_attend if float32 else bf16_attend
    for module in model.vision.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.__class__ = Float32CpuAttention if float32 else nn.MultiheadAttention


def recipe_world(model_dir: str, out_dir: str, images: int = 160, videos: int = 80, **overrides) -> str:
    """A small shapes world with the settings the model at `model_dir` was trained on (its
    evaluation.json, then `overrides`) in `out_dir`: training images and videos only. Returns its train.jsonl."""
    with open(os.path.join(model_dir, "evaluation.json")) as f:
        world = json.load(f)["shapes_world"]
    settings = {**world, "train_images": images, "train_videos": videos, "val_images": 0, "val_videos": 0,
                "test_images": 0, "test_videos": 0, "text_samples": 0, **overrides}
    generate_shapes_world(out_dir, ShapesWorldConfig(**settings))
    return os.path.join(out_dir, "train.jsonl")


def recipe_bench_arguments(doc: str, argv=None, add_arguments=None) -> argparse.Namespace:
    """The command line shared by the recipe benches (--rounds, --batch-size, --model, --json; a bench's
    own through `add_arguments(parser)`), checked before anything runs."""
    parser = bench_parser(doc, rounds=7)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--model", default=os.path.join(ROOT, "fusion", "default_model"),
                        help="a model folder published by examples/recipes/publish_default_model.py")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "evaluation.json")):
        parser.error(f"argument --model: {args.model} has no evaluation.json. The recipe benches build their "
                     "shapes world with the settings the model was trained on, read from the evaluation.json "
                     "that examples/recipes/publish_default_model.py writes beside the model it publishes: give "
                     "a folder published that way (the default is fusion/default_model)")
    return args


def recipe_bench_setup(args: argparse.Namespace) -> FusionModel:
    """Seeds, and the model of `args.model`."""
    torch.manual_seed(0)
    random.seed(0)
    return FusionModel.from_pretrained(args.model)


def recipe_train_step(model: FusionModel, bf16: bool = True):
    """Everything trainable, AdamW -> `train_step(groups, pack_length=None)`: forward, backward (each group of
    samples padded as one batch, or packed into rows of `pack_length` tokens) and an optimizer step, under bf16
    autocast if `bf16`; returns its seconds."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    step = TrainingStep(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    pad = model.processor.tokenizer.pad_id

    def train_step(groups: list[list], pack_length: int | None = None) -> float:
        normalizer = torch.tensor(float(sum(int((s.labels[1:] != -100).sum()) for g in groups for s in g)))
        start = time.perf_counter()
        for group in groups:  # (`pack_length`: each group packed into rows of that many tokens, as `pack: true`)
            batch = collate_samples(group, pad, pack_length is not None, pack_length or 1024)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _, _ = step(batch.model_inputs(), normalizer, 1.0)
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return train_step


def report(args, results: dict) -> dict:
    """Machine, torch and settings + `results`: printed as JSON, and written to --json if given."""
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": args.batch_size,
              "rounds": args.rounds, **results}
    return print_results(result, args.json)


def parse_arguments(argv=None) -> argparse.Namespace:
    return recipe_bench_arguments(__doc__, argv)


def main(argv=None):
    args = parse_arguments(argv)
    model = recipe_bench_setup(args)
    if not cpu_has_native_bf16():
        sys.exit("bench/recipe_step.py compares attention under bf16 autocast, but this CPU has no native bf16 "
                 "(no AVX512-BF16 or AMX): torch would emulate it and the figures would time that emulation. "
                 "Run it on a CPU with native bf16.")
    with tempfile.TemporaryDirectory() as tmp:
        data = ConversationDataset(recipe_world(args.model, tmp), model.processor, group_by_media=True)
        batches = [[data[i] for i in draw] for draw in
                   draw_batches(range(len(data)), args.batch_size, args.rounds + 1, "samples of train.jsonl")]
    train_step = recipe_train_step(model)

    def run(samples, way):
        set_attention(model, float32=way != "old")
        return train_step(split_by_length(samples, 2) if way == "buckets" else [samples])

    for way in WAYS:  # warm-up
        run(batches[0], way)
    times = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in round_order(WAYS, r):
            times[way].append(run(batches[r + 1], way))
    median = {way: statistics.median(t) for way, t in times.items()}
    return report(args, {
        "median_step_s": {w: round(m, 3) for w, m in median.items()},
        "speedup_vs_old": {w: round(median["old"] / m, 2) for w, m in median.items()},
        "all_step_s": {w: [round(x, 3) for x in t] for w, t in times.items()},
    })


if __name__ == "__main__":
    main()
