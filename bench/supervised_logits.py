"""What computing logits only at supervised positions saves per training step.

A training sample supervises only its answers: the image tokens, the prompts, the chat headers and the
padding predict nothing the loss counts. `TrainingStep` therefore asks the model for the logits of the
supervised positions only (`logits_at`), so the LM head and its float32 softmax skip the rest. Two ways,
alternating in every round (the order flipped every round) on the very same batches, so machine noise
hits both alike:

    full        the LM head on every position, cross-entropy with ignore_index (the step before)
    supervised  the LM head on the supervised positions only (what fusion's trainer does)

on two models:

    recipe      the default model, everything trainable, on 32 shared-prefix samples of a shapes world
                with the recipe's settings (its vocabulary: 457 tokens), under `precision: auto`
    llama4      a small decoder with Llama 4's vocabulary (202048 tokens), 4 sequences of 256 tokens of
                which the last 20% are supervised, in float32

Each reports the median step (forward, backward, AdamW), the ratio full / supervised, and how many
logits one step materialises each way (x 4 bytes in float32).

    python bench/supervised_logits.py                    # 7 rounds
    python bench/supervised_logits.py --rounds 3 --json out.json
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
from recipe_step import recipe_bench_arguments, recipe_bench_setup, recipe_world, report  # noqa: E402
from rounds import round_order  # noqa: E402

import fusion  # noqa: E402
from fusion.data.collate import split_by_length  # noqa: E402
from fusion.data.datasets import ConversationDataset  # noqa: E402
from fusion.decoder import IGNORE_INDEX, next_token_targets  # noqa: E402
from fusion.precision import computed_in, has_native_bf16  # noqa: E402
from fusion.data.stage_data import collate_samples  # noqa: E402

WAYS = ("full", "supervised")
LLAMA4_VOCAB = 202048


def token_loss(forward, labels: torch.Tensor, way: str) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of `forward(**kwargs)` either way -> (loss, logits computed)."""
    targets = next_token_targets(labels)
    if way == "full":
        logits = forward().logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    else:
        supervised = targets != IGNORE_INDEX
        logits = forward(logits_at=supervised).logits
        loss = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
    return loss, logits.numel()


def timed_step(model, optimizer, batches, way: str, bf16: bool) -> tuple[float, int]:
    """Forward, backward over `batches` (each a (forward, labels) pair), AdamW -> (seconds, logits computed)."""
    start, computed = time.perf_counter(), 0
    for forward, labels in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = token_loss(forward, labels, way)
        loss.backward()
        computed += n
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, computed


def compare(model, make_batches, rounds: int, bf16: bool) -> dict:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for way in WAYS:  # warm-up
        timed_step(model, optimizer, make_batches(0), way, bf16)
    times = {way: [] for way in WAYS}
    logits = {}
    for r in range(rounds):
        batches = make_batches(r + 1)
        for way in round_order(WAYS, r):
            seconds, logits[way] = timed_step(model, optimizer, batches, way, bf16)
            times[way].append(seconds)
    median = {way: statistics.median(t) for way, t in times.items()}
    return {"median_step_s": {w: round(m, 3) for w, m in median.items()},
            "speedup": round(median["full"] / median["supervised"], 3),
            "logits_per_step": logits,
            "all_step_s": {w: [round(x, 3) for x in t] for w, t in times.items()}}


def recipe_case(args, model) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = ConversationDataset(recipe_world(args.model, tmp), model.processor, group_by_media=True)
        samples = [[data[i] for i in draw] for draw in
                   draw_batches(range(len(data)), args.batch_size, args.rounds + 1, "samples of train.jsonl")]
    pad = model.processor.tokenizer.pad_id

    def make_batches(r):
        batches = []
        for group in split_by_length(samples[r], 2):  # the recipe's length_buckets: 2
            inputs = collate_samples(group, pad, False, 1024).model_inputs()
            labels = inputs.pop("labels")
            batches.append((lambda inputs=inputs, **kw: model(**inputs, **kw), labels))
        return batches

    bf16 = has_native_bf16(torch.device("cpu"))
    return {"computed_in": computed_in(bf16), **compare(model, make_batches, args.rounds, bf16)}


def llama4_vocab_case(args) -> dict:
    torch.manual_seed(0)
    config = fusion.DecoderConfig(vocab_size=LLAMA4_VOCAB, hidden_size=256, num_layers=2, num_heads=8,
                                  num_kv_heads=2, head_dim=32, intermediate_size=512, intermediate_size_mlp=768,
                                  num_experts=4, top_k=1, attention_chunk_size=256)
    decoder = fusion.Decoder(config)
    batch, length = 4, 256

    def make_batches(r):
        ids = torch.randint(0, LLAMA4_VOCAB, (batch, length), generator=torch.Generator().manual_seed(r))
        labels = ids.clone()
        labels[:, : int(length * 0.8)] = IGNORE_INDEX
        return [(lambda ids=ids, **kw: decoder(ids, **kw), labels)]

    return {"computed_in": computed_in(False), "tokens_per_step": batch * length, "vocab_size": LLAMA4_VOCAB,
            **compare(decoder, make_batches, args.rounds, bf16=False)}


def parse_arguments(argv=None) -> argparse.Namespace:
    return recipe_bench_arguments(__doc__, argv)


def main(argv=None):
    args = parse_arguments(argv)
    model = recipe_bench_setup(args)
    return report(args, {"recipe": recipe_case(args, model), "llama4": llama4_vocab_case(args)})


if __name__ == "__main__":
    main()
