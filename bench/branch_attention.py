"""Would attention computed per question branch beat one masked attention over a grouped sample?

A grouped sample (`group_by_media: true`) is a shared prefix (the image or the video's frames) followed by
branches (its questions) that each see the prefix and themselves only. The decoder computes it as one
causal attention over the whole row with a mask that hides the other branches (`build_attention_mask`):
most of the scores it computes are masked out. The alternative measured here gathers each branch's
queries, and the keys and values of its prefix and of itself, into a batch of short rows (one per
branch, padded to the longest branch), runs attention on those plus the prefix on its own, and scatters
the outputs back: the same result with a fraction of the scores, at the cost of the gathers, the
scatters and many more, shorter attention problems.

One measurement = forward and backward of one attention layer (float32, the default model's 8 query /
2 key-value heads of 32) over the micro-batches one training step of the recipe computes: 32 samples
drawn like a stage draws them, split into rows and length buckets as the recipe does. Two stages'
draws are measured: `unfreeze` (train.jsonl: images with ~7 questions, videos with ~3) and `relation`
(train.jsonl, train_extra.jsonl and the clips again, rows of at most 224 tokens). The two ways alternate
in every round on the very same rows, so machine noise hits both alike; the largest difference between their
outputs is reported too. On the project's 2-core CPU it did not (0.74-0.76x, BENCHMARKS.md).

    python bench/branch_attention.py                  # 7 rounds; medians and the ratio
    python bench/branch_attention.py --rounds 9 --json out.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arguments import draw_batches  # noqa: E402
from compiled_step import last_stage_batches  # noqa: E402
from recipe_step import recipe_bench_arguments, recipe_bench_setup, report  # noqa: E402
from rounds import round_order  # noqa: E402
from row_split import plan  # noqa: E402

from fusion.attention import build_attention_mask  # noqa: E402
from fusion.data.datasets import ConversationDataset  # noqa: E402
from fusion.data.stage_data import collate_samples  # noqa: E402

WAYS = ("masked", "per-branch")


class BranchLayout:
    """Where the prefix and each branch of every row of a padded micro-batch sit, as index tensors."""

    def __init__(self, branch_ids: torch.Tensor, valid: torch.Tensor):
        B, T = branch_ids.shape
        prefix_len = int(((branch_ids == 0) & valid).sum(1).max())
        self.B, self.T, self.P = B, T, prefix_len
        rows = []  # (row, prefix length, branch token positions)
        for b in range(B):
            ids, ok = branch_ids[b], valid[b]
            prefix = int(((ids == 0) & ok).sum())
            for branch in ids[ok].unique().tolist():
                if branch:
                    rows.append((b, prefix, ((ids == branch) & ok).nonzero().squeeze(1)))
        L = max(len(tokens) for _, _, tokens in rows)
        n = len(rows)
        self.query = torch.zeros(n, L, dtype=torch.long)      # flat token index of each branch query
        self.key = torch.zeros(n, prefix_len + L, dtype=torch.long)
        self.mask = torch.zeros(n, 1, L, prefix_len + L, dtype=torch.bool)
        self.real = torch.zeros(n, L, dtype=torch.bool)
        for r, (b, prefix, tokens) in enumerate(rows):
            m, flat = len(tokens), b * T + tokens
            self.query[r, :m], self.query[r, m:] = flat, flat[-1]
            self.real[r, :m] = True
            self.key[r, :prefix] = b * T + torch.arange(prefix)
            self.key[r, prefix:] = b * T + tokens[0]  # padding keys, masked
            self.key[r, prefix_len:prefix_len + m] = flat
            self.mask[r, 0, :, :prefix] = True
            self.mask[r, 0, :m, prefix_len:prefix_len + m] = torch.ones(m, m, dtype=torch.bool).tril()
            self.mask[r, 0, m:, 0] = True  # padding queries see one key (their output is dropped)
        self.prefix_mask = build_attention_mask(torch.arange(prefix_len).expand(B, -1),
                                                torch.arange(prefix_len).expand(B, -1),
                                                k_valid=(branch_ids[:, :prefix_len] == 0) & valid[:, :prefix_len])
        self.destination = self.query[self.real]

    def attend(self, q, k, v):
        """q [B, H, T, D], k and v [B, KV, T, D] -> [B, H, T, D]; padding positions come out as 0."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        flat_q = q.transpose(1, 2).reshape(B * T, H, D)
        flat_k = k.transpose(1, 2).reshape(B * T, KV, D)
        flat_v = v.transpose(1, 2).reshape(B * T, KV, D)
        P = self.P
        prefix = F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], attn_mask=self.prefix_mask,
                                                enable_gqa=True)
        branches = F.scaled_dot_product_attention(flat_q[self.query].transpose(1, 2), flat_k[self.key].transpose(1, 2),
                                                  flat_v[self.key].transpose(1, 2), attn_mask=self.mask,
                                                  enable_gqa=True)
        out = flat_q.new_zeros(B, T, H, D)
        out = out.index_copy(1, torch.arange(P), prefix.transpose(1, 2)).reshape(B * T, H, D)
        out = out.index_copy(0, self.destination, branches.transpose(1, 2)[self.real])
        return out.view(B, T, H, D).transpose(1, 2)


class MicroBatch:
    """One padded micro-batch's attention problem: random q, k, v of its shape, its mask and its layout."""

    def __init__(self, batch, heads=8, kv_heads=2, head_dim=32):
        inputs = batch.model_inputs()
        valid = inputs["attention_mask"].bool()
        B, T = valid.shape
        positions = inputs.get("positions")
        if positions is None:
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        branch_ids = inputs["branch_ids"]
        self.mask = build_attention_mask(positions, positions, k_valid=valid, q_branches=branch_ids,
                                         k_branches=branch_ids)
        self.layout = BranchLayout(branch_ids, valid)
        self.valid = valid
        self.q = torch.randn(B, heads, T, head_dim, requires_grad=True)
        self.k = torch.randn(B, kv_heads, T, head_dim, requires_grad=True)
        self.v = torch.randn(B, kv_heads, T, head_dim, requires_grad=True)
        self.grad = torch.randn(B, heads, T, head_dim) * valid[:, None, :, None]

    def forward(self, way: str):
        if way == "masked":
            return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.mask, enable_gqa=True)
        return self.layout.attend(self.q, self.k, self.v)

    def step(self, way: str):
        self.forward(way).backward(self.grad)
        self.q.grad = self.k.grad = self.v.grad = None

    def max_difference(self) -> float:
        with torch.no_grad():
            keep = self.valid[:, None, :, None]
            return float(((self.forward("masked") - self.forward("per-branch")) * keep).abs().max())


def stage_draws(model, model_dir: str, tmp: str, batch_size: int, count: int) -> dict[str, list[list]]:
    """Micro-batches of `count` steps as the recipe's unfreeze and relation stages plan them."""
    relation = last_stage_batches(model, model_dir, tmp, batch_size, count)  # writes the world to tmp
    train = ConversationDataset(os.path.join(tmp, "train.jsonl"), model.processor, group_by_media=True)
    unfreeze = [[train[i] for i in draw] for draw in draw_batches(range(len(train)), batch_size, count,
                                                                  "samples of train.jsonl")]
    pad = model.processor.tokenizer.pad_id

    def micro_batches(samples, max_row_tokens):
        return [MicroBatch(collate_samples(g, pad, False, 1024)) for g in plan(samples, model.patch_id, max_row_tokens, 2)]

    return {"unfreeze": [micro_batches(s, None) for s in unfreeze],
            "relation": [micro_batches(s, 224) for s in relation]}


def parse_arguments(argv=None) -> argparse.Namespace:
    return recipe_bench_arguments(__doc__, argv)


def main(argv=None):
    args = parse_arguments(argv)
    model = recipe_bench_setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        draws = stage_draws(model, args.model, tmp, args.batch_size, args.rounds + 1)
    results = {"median_ms": {}, "masked_over_per_branch": {}, "max_difference": {}, "all_ms": {}}
    for stage, steps in draws.items():
        times = {way: [] for way in WAYS}
        for r, micro in enumerate(steps):
            for way in round_order(WAYS, r):
                start = time.perf_counter()
                for m in micro:
                    m.step(way)
                if r:  # the first round warms up
                    times[way].append((time.perf_counter() - start) * 1e3)
        median = {way: statistics.median(t) for way, t in times.items()}
        results["median_ms"][stage] = {w: round(m, 1) for w, m in median.items()}
        results["masked_over_per_branch"][stage] = round(median["masked"] / median["per-branch"], 2)
        results["max_difference"][stage] = max(m.max_difference() for micro in steps for m in micro)
        results["all_ms"][stage] = {w: [round(x, 1) for x in t] for w, t in times.items()}
    return report(args, results)


if __name__ == "__main__":
    main()
