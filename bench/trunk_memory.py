"""Host memory of each process that trains on a Llama 4 trunk under torchrun: the trunk read whole in every
process (DDP) or shard by shard (FSDP2).

Writes a Hugging Face Llama 4 text checkpoint (random weights, stored in bf16; its size set by --hidden-size,
--layers and --experts, ~250 M parameters by default) with a Llama-4-style tokenizer, and a small shapes world;
then trains on it with `fusion.trainer.train` under a 2-process torchrun (gloo, CPU, one thread each): one
step of a stage that trains the tower and adapter against the frozen trunk, and the stage's model saved, as
a co-training run starts. Each process reports its peak resident memory (`ru_maxrss`, which counts the pages
of the memory-mapped checkpoint it has read too) three times: just before the trunk's weights are read (under
FSDP2 the decoder is on the meta device and sharded then, the tiny tower and adapter built), once they are
read (`HfDecoderWeights.copy_into` returned: the model is ready to train) and at the end of the run (the main
process gathers the whole model into its memory to write it, in both ways). The two ways alternate, the
order flipped every round; medians over the rounds.

    python bench/trunk_memory.py                     # 3 rounds
    python bench/trunk_memory.py --rounds 1 --hidden-size 512 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion  # noqa: E402
from arguments import json_output_path, positive_int  # noqa: E402
from fusion.data.shapes_world import ShapesWorldConfig, generate_shapes_world  # noqa: E402
from fusion.hf_llama4 import save_hf_decoder  # noqa: E402
from fusion.stage_setup import _texts_of  # noqa: E402
from recipe_step import report  # noqa: E402
from rounds import round_order  # noqa: E402
from tests.tiny_models import llama4_style_tokenizer  # noqa: E402

WAYS = ("ddp", "fsdp2")

# What each process of the 2-process run executes: the run, with its peak memory noted when the trunk is read
# and when the run ends (kB on Linux).
WORKER = """
import json, os, resource, sys
import fusion.trainer
from fusion.hf_llama4 import HfDecoderWeights

peaks = {}
copy_into = HfDecoderWeights.copy_into

def copy_and_note(self, decoder):
    peaks["before_trunk_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    copy_into(self, decoder)
    peaks["trunk_read_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

HfDecoderWeights.copy_into = copy_and_note
fusion.trainer.train(sys.argv[1], progress=False)
peaks["run_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(peaks, f)
"""


def write_trunk(folder: Path, world: Path, args) -> int:
    """A Hugging Face Llama 4 checkpoint (bf16) with a Llama-4-style tokenizer in `folder`; its parameter count."""
    ids = llama4_style_tokenizer(folder, _texts_of([world / "text.jsonl", world / "train.jsonl"]))
    heads = args.hidden_size // 64
    config = fusion.DecoderConfig(vocab_size=max(ids.values()) + 1, hidden_size=args.hidden_size,
                                  num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=64,
                                  intermediate_size=args.hidden_size, intermediate_size_mlp=2 * args.hidden_size,
                                  num_experts=args.experts, top_k=1, interleave_moe_layer_step=2, nope_interval=4,
                                  attention_chunk_size=256)
    torch.manual_seed(0)
    decoder = fusion.Decoder(config).to(torch.bfloat16)
    save_hf_decoder(decoder, folder)
    return sum(p.numel() for p in decoder.parameters())


def run_config(tmp: Path, world: Path, trunk: Path, way: str, index: int) -> Path:
    config = {
        "name": f"{way}-{index}", "output_dir": str(tmp / f"run-{way}-{index}"), "seed": 0, "threads": 1,
        "log_every": 1, "checkpoint_every": 0, "precision": "fp32", "distributed": {"strategy": way},
        "model": {"trunk": str(trunk), "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                  "heads": 2}, "video": {"num_frames": 2}},
        "stages": [{"name": "cotrain", "data": str(world / "train.jsonl"), "steps": 1, "batch_size": 4,
                    "lr": {"vision": 1e-3, "adapter": 1e-3}}],
    }
    path = tmp / f"{way}-{index}.yaml"  # (JSON is YAML too)
    path.write_text(json.dumps(config))
    return path


def measure(tmp: Path, config: Path, way: str, index: int) -> list[dict]:
    """Run `config` under a 2-process torchrun; each process's peaks."""
    out = tmp / f"peaks-{way}-{index}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp / "worker.py"), str(config), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"the 2-process {way} run failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def multiple_of_64(text: str) -> int:
    """argparse type: the trunk's width, a whole multiple of 64 (heads of 64)."""
    value = positive_int(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"the width must be a multiple of 64 (heads of 64), got {value}")
    return value


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--hidden-size", type=multiple_of_64, default=1024, help="the trunk's width")
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=16, help="experts of each MoE layer (every other one)")
    parser.add_argument("--json", type=json_output_path, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.batch_size = 4  # (the run's; reported with the results)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        world = tmp / "world"
        generate_shapes_world(world, ShapesWorldConfig(image_size=32, train_images=16, val_images=2, test_images=2,
                                                       train_videos=2, val_videos=1, test_videos=1, video_size=32,
                                                       video_frames=6, text_samples=50, seed=1))
        parameters = write_trunk(tmp / "trunk", world, args)
        (tmp / "worker.py").write_text(WORKER)
        peaks = {way: [] for way in WAYS}
        for r in range(args.rounds):
            for way in round_order(WAYS, r):
                peaks[way].append(measure(tmp, run_config(tmp, world, tmp / "trunk", way, r), way, r))

    def median(way, rank, key):
        return round(statistics.median(p[rank][key] for p in peaks[way]))

    results = {way: {f"rank{rank}": {key: median(way, rank, key) for key in ("before_trunk_mb", "trunk_read_mb",
                                                                             "run_mb")}
                     for rank in (0, 1)} for way in WAYS}

    def trunk_share(way):  # what reading the trunk added to the second process's peak
        return results[way]["rank1"]["trunk_read_mb"] - results[way]["rank1"]["before_trunk_mb"]

    return report(args, {
        "trunk_parameters_m": round(parameters / 1e6, 1),
        "trunk_float32_mb": round(parameters * 4 / 2**20),
        "peak_rss_mb": results,
        "rank1_trunk_added_mb": {way: trunk_share(way) for way in WAYS},
        "rank1_trunk_added_ddp_over_fsdp2": round(trunk_share("ddp") / trunk_share("fsdp2"), 2),
        "rank1_peak_after_reading_ddp_over_fsdp2": round(results["ddp"]["rank1"]["trunk_read_mb"]
                                                         / results["fsdp2"]["rank1"]["trunk_read_mb"], 2),
        "all_peaks_mb": {way: [[{k: round(v) for k, v in rank.items()} for rank in p] for p in peaks[way]]
                         for way in WAYS},
    })


if __name__ == "__main__":
    main()
