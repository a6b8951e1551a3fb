"""Training-step throughput: fusion.Decoder vs transformers' Llama4ForCausalLM, same config, same weights.

One step = forward with labels, backward, AdamW (fused, the same for both). The two models alternate in one
process, the order flipped every round (A, B, B, A, ...), so machine noise hits both alike; we report medians,
the ratio, and the model FLOP utilisation (MFU): 6 x active parameters x tokens per second, divided by the
float32 matmul rate measured in the same run.

    python bench/train_step.py                 # experts 1, 4, 16 (the BENCHMARKS.md table)
    python bench/train_step.py --experts 16 --rounds 3 --json out.json
    python bench/train_step.py --profile 16    # where one step of fusion's decoder spends its time
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion  # noqa: E402
from arguments import json_output_path, non_negative_int, positive_int  # noqa: E402
from fusion.hf_llama4 import hf_config_from_decoder, hf_key  # noqa: E402
from rounds import round_order  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERT_WIDTH = 512, 4, 8, 2, 64, 1024
BATCH, SEQ = 8, 256


def decoder_config(num_experts: int, vocab: int) -> fusion.DecoderConfig:
    return fusion.DecoderConfig(vocab_size=vocab, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=EXPERT_WIDTH,
                                intermediate_size_mlp=2 * EXPERT_WIDTH, num_experts=num_experts, top_k=1,
                                interleave_moe_layer_step=1, nope_interval=4, attention_chunk_size=8192,
                                use_qk_norm=True)


def build_pair(num_experts: int, vocab: int):
    """Our decoder and an HF Llama4ForCausalLM holding the very same weights."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    ours = fusion.Decoder(decoder_config(num_experts, vocab))
    hf_cfg = hf_config_from_decoder(ours.config)
    for key in ("architectures", "model_type", "torch_dtype"):
        hf_cfg.pop(key)
    rope = {"rope_type": "default", "rope_theta": hf_cfg.pop("rope_theta")}
    hf_cfg.pop("rope_scaling")
    try:
        config = Llama4TextConfig(**hf_cfg, rope_parameters=rope)
    except TypeError:  # transformers 4.5x
        config = Llama4TextConfig(**hf_cfg, rope_theta=rope["rope_theta"])
    config._attn_implementation = "sdpa"
    theirs = Llama4ForCausalLM(config)
    state = {hf_key(k): v for k, v in ours.state_dict().items() if not k.endswith("expert_bias")}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ours.train(), theirs.train()


def active_params(config: fusion.DecoderConfig) -> int:
    """Parameters a token passes through in matmuls (embedding lookup excluded, LM head included)."""
    d = config.hidden_size
    attention = d * config.num_heads * config.head_dim * 2 + d * config.num_kv_heads * config.head_dim * 2
    expert = 3 * d * config.intermediate_size
    moe = d * config.num_experts + expert * (1 + config.top_k)  # router + shared + top-k routed
    return config.num_layers * (attention + moe) + d * config.vocab_size


def matmul_rate(n: int = 2048, repeats: int = 7) -> float:
    """Float32 matmul FLOP/s on this machine now (median of `repeats` n x n x n products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def make_step(model, is_hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size

    def step():
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
        if is_hf:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not is_hf:
            model.update_expert_bias()
        return loss.item()

    return step


def bench(num_experts: int, vocab: int, rounds: int, warmup: int) -> dict:
    ours, theirs = build_pair(num_experts, vocab)
    steps = {"fusion": make_step(ours, False), "transformers": make_step(theirs, True)}
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    rates = []
    for r in range(rounds):
        rates.append(matmul_rate())
        for name in round_order(list(steps), r):
            fn = steps[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = BATCH * SEQ
    rate = statistics.median(rates)
    flops_per_step = 6 * active_params(ours.config) * tokens
    result = {"experts": num_experts, "vocab": vocab, "tokens_per_step": tokens, "rounds": rounds,
              "matmul_gflops": rate / 1e9, "active_params": active_params(ours.config)}
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = {"step_s": t, "tokens_per_s": tokens / t, "mfu": flops_per_step / t / rate,
                        "all_step_s": ts}
    result["ratio"] = result["fusion"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def profile_step(num_experts: int, vocab: int, steps: int = 2) -> None:
    """Print torch.profiler's table of `steps` fusion training steps (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    ours, _ = build_pair(num_experts, vocab)
    step = make_step(ours, False)
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"fusion decoder, {num_experts} experts, {steps} training steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--vocab", type=positive_int, default=8192)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count())
    parser.add_argument("--json", type=json_output_path, help="also write the results here")
    parser.add_argument("--profile", type=positive_int, metavar="EXPERTS",
                        help="only profile fusion's step with this many experts")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        profile_step(args.profile, args.vocab)
        return
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"config: hidden {HIDDEN}, {LAYERS} layers, {HEADS}/{KV_HEADS} heads, head dim {HEAD_DIM}, expert width "
          f"{EXPERT_WIDTH}, top-1, batch {BATCH}x{SEQ}, vocab {args.vocab}; medians of {args.rounds} alternating rounds")
    results = []
    for e in args.experts:
        r = bench(e, args.vocab, args.rounds, args.warmup)
        results.append(r)
        print(f"experts {e:3d}: fusion {r['fusion']['tokens_per_s']:8.0f} tok/s (MFU {r['fusion']['mfu']:.0%})  "
              f"transformers {r['transformers']['tokens_per_s']:8.0f} tok/s (MFU {r['transformers']['mfu']:.0%})  "
              f"ratio {r['ratio']:.2f}x  [fp32 matmul {r['matmul_gflops']:.0f} GFLOP/s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
