"""Host memory of each process of a torchrun that starts from a large model: the model read whole in every
process (DDP) or shard by shard (FSDP2).

Writes a Hugging Face Llama 4 text checkpoint (random weights, stored in bf16; its size set by --hidden-size,
--layers and --experts, ~260 M parameters by default) with a Llama-4-style tokenizer, and a small shapes world.
Two starts, each under a 2-process torchrun (gloo, CPU, one thread each) running `fusion.trainer.train`:

    trunk    `model.trunk` is that checkpoint; one step of a stage that trains the tower and adapter against
             the frozen trunk, an evaluation (validation loss and accuracy, 2 samples), and the stage's model
             saved, as a co-training run starts; three ways: ddp, fsdp2, and fsdp2-gathered (FSDP2 with
             `distributed.gather_for_eval`: every block held gathered while the processes evaluate)
    resume   `--resume` of a one-process run of that trunk with everything trained, stopped after its first
             step (its checkpoint: the model in float32 and AdamW's two moments per parameter); the second step

Each process reports its peak resident memory (`ru_maxrss`, which counts the pages of the memory-mapped files
it has read too) when the run begins to build its model, once the model is ready (`Trainer._starting_model`
returned), once the optimizer's state is loaded (resume only: each process reads its part of it), before and
after the evaluation (trunk only: under DDP the main process evaluates alone, under FSDP2 every process on its
shards; the main process's evaluation time is reported too) and at the end of the run (the main process
writes the models and the checkpoints' models: under DDP from the whole model it holds, under FSDP2 one
gathered tensor at a time; a checkpoint's optimizer state is written by each process, its part). A start's
ways alternate, the order flipped every round; medians over the rounds.

    python bench/starting_memory.py                     # 3 rounds
    python bench/starting_memory.py --rounds 1 --hidden-size 512 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion.trainer  # noqa: E402
from arguments import bench_parser, positive_int  # noqa: E402
from fusion.data.shapes_world import ShapesWorldConfig, generate_shapes_world  # noqa: E402
from fusion.hf_llama4 import save_hf_decoder  # noqa: E402
from fusion.stage_setup import _texts_of  # noqa: E402
from recipe_step import report  # noqa: E402
from rounds import round_order  # noqa: E402
from tests.tiny_models import llama4_style_tokenizer  # noqa: E402

WAYS = {"trunk": ("ddp", "fsdp2", "fsdp2-gathered"), "resume": ("ddp", "fsdp2")}  # each start's ways
STARTS = tuple(WAYS)
DISTRIBUTED = {"ddp": {"strategy": "ddp"}, "fsdp2": {"strategy": "fsdp2"},
               "fsdp2-gathered": {"strategy": "fsdp2", "gather_for_eval": True}}

# What each process of a 2-process run executes (`worker.py CONFIG OUT [--resume]`): the run, with its peak
# memory (kB on Linux) noted at the points the docstring names, written to OUT/rank{N}.json.
WORKER = """
import json, os, resource, sys, time
import fusion.trainer

Trainer = fusion.trainer.Trainer
peaks = {}

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def noting(method, before, after):
    def wrapped(*args, **kwargs):
        if before:
            peaks[before] = peak()
        start = time.perf_counter()
        result = method(*args, **kwargs)
        peaks[after] = peak()
        peaks[after.replace("_mb", "_s")] = time.perf_counter() - start  # (how long the method took)
        return result
    return wrapped

Trainer._starting_model = noting(Trainer._starting_model, "before_model_mb", "model_ready_mb")
Trainer._resume_stage = noting(Trainer._resume_stage, None, "optimizer_loaded_mb")
Trainer._evaluate = noting(Trainer._evaluate, "before_eval_mb", "evaluated_mb")
fusion.trainer.train(sys.argv[1], resume="--resume" in sys.argv, progress=False)
peaks["run_mb"] = peak()
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


def write_config(path: Path, out: Path, world: Path, trunk: Path, lr: dict, steps: int, evaluate: bool = False,
                 **extra) -> Path:
    stage = {"name": "stage", "data": str(world / "train.jsonl"), "steps": steps, "batch_size": 4, "lr": lr}
    if evaluate:
        stage["eval"] = {"data": str(world / "val.jsonl"), "limit": 2, "loss_batches": 1}
    config = {
        "name": path.stem, "output_dir": str(out), "seed": 0, "threads": 1, "log_every": 1, "checkpoint_every": 0,
        "precision": "fp32",
        "model": {"trunk": str(trunk), "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                  "heads": 2}, "video": {"num_frames": 2}},
        "stages": [stage],
        **extra,
    }
    path.write_text(json.dumps(config))  # (JSON is YAML too)
    return path


def stopped_run(tmp: Path, world: Path, trunk: Path) -> Path:
    """A one-process run of 2 steps that trains everything, checkpointed after each; its `latest.json` then
    names the checkpoint of step 1 (mid-stage: with the optimizer's state), as if it had stopped there."""
    out = tmp / "stopped"
    config = write_config(tmp / "stopped.yaml", out, world, trunk, {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-4},
                          2, checkpoint_every=1)
    fusion.trainer.train(config, progress=False)
    pointer = out / "checkpoints" / "latest.json"
    pointer.write_text(json.dumps({"folder": "step-0000001", "step": 1}))
    return out


def measure(tmp: Path, config: Path, resume: bool, label: str) -> list[dict]:
    """Run `config` under a 2-process torchrun; each process's peaks."""
    out = tmp / f"peaks-{label}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp / "worker.py"), str(config), str(out)] + (["--resume"] if resume else []),
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the 2-process run {label} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def multiple_of_64(text: str) -> int:
    """argparse type: the trunk's width, a whole multiple of 64 (heads of 64)."""
    value = positive_int(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"the width must be a multiple of 64 (heads of 64), got {value}")
    return value


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = bench_parser(__doc__, rounds=3)
    parser.add_argument("--hidden-size", type=multiple_of_64, default=1024, help="the trunk's width")
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=16, help="experts of each MoE layer (every other one)")
    args = parser.parse_args(argv)
    args.batch_size = 4  # (the runs'; reported with the results)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        world = tmp / "world"
        generate_shapes_world(world, ShapesWorldConfig(image_size=32, train_images=16, val_images=2, test_images=2,
                                                       train_videos=2, val_videos=1, test_videos=1, video_size=32,
                                                       video_frames=6, text_samples=50, seed=1))
        trunk = tmp / "trunk"
        parameters = write_trunk(trunk, world, args)
        stopped = stopped_run(tmp, world, trunk)
        (tmp / "worker.py").write_text(WORKER)
        peaks = {(start, way): [] for start in STARTS for way in WAYS[start]}
        for r in range(args.rounds):
            for way in round_order(WAYS["trunk"], r):
                label = f"trunk-{way}-{r}"
                config = write_config(tmp / f"{label}.yaml", tmp / label, world, trunk,
                                      {"vision": 1e-3, "adapter": 1e-3}, 1, evaluate=True,
                                      distributed=DISTRIBUTED[way])
                peaks["trunk", way].append(measure(tmp, config, False, label))
                shutil.rmtree(tmp / label)  # (its models: ~2 GB a run by default)
            for way in round_order(WAYS["resume"], r):
                label = f"resume-{way}-{r}"
                run = tmp / label  # a copy of the stopped run's folder for each resume (a resume writes into it)
                shutil.copytree(stopped, run)
                config = write_config(tmp / f"{label}.yaml", run, world, trunk,
                                      {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-4}, 2, checkpoint_every=1,
                                      distributed=DISTRIBUTED[way])
                peaks["resume", way].append(measure(tmp, config, True, label))
                shutil.rmtree(run)

    def median(start, way, rank, key):
        return round(statistics.median(p[rank][key] for p in peaks[start, way]))

    keys = {"trunk": ("before_model_mb", "model_ready_mb", "before_eval_mb", "evaluated_mb", "run_mb"),
            "resume": ("before_model_mb", "model_ready_mb", "optimizer_loaded_mb", "run_mb")}
    results = {start: {way: {f"rank{rank}": {key: median(start, way, rank, key) for key in keys[start]}
                             for rank in (0, 1)} for way in WAYS[start]} for start in STARTS}

    def added(start, way, upto):  # what loading added to the second process's peak
        second = results[start][way]["rank1"]
        return second[upto] - second["before_model_mb"]

    return report(args, {
        "trunk_parameters_m": round(parameters / 1e6, 1),
        "trunk_float32_mb": round(parameters * 4 / 2**20),
        "peak_rss_mb": results,
        "rank1_added_by_loading_mb": {
            "trunk": {way: added("trunk", way, "model_ready_mb") for way in WAYS["trunk"]},
            "resume": {way: added("resume", way, "optimizer_loaded_mb") for way in WAYS["resume"]}},
        "rank0_added_by_evaluation_mb": {way: results["trunk"][way]["rank0"]["evaluated_mb"]
                                         - results["trunk"][way]["rank0"]["before_eval_mb"] for way in WAYS["trunk"]},
        "evaluation_s": {way: round(statistics.median(p[0]["evaluated_s"] for p in peaks["trunk", way]), 2)
                         for way in WAYS["trunk"]},
        "rank1_added_ddp_over_fsdp2": {
            "trunk": round(added("trunk", "ddp", "model_ready_mb") / added("trunk", "fsdp2", "model_ready_mb"), 2),
            "resume": round(added("resume", "ddp", "optimizer_loaded_mb")
                            / added("resume", "fsdp2", "optimizer_loaded_mb"), 2)},
        "all_peaks_mb": {f"{start}-{way}": [[{k: round(v) for k, v in rank.items() if k.endswith("_mb")} for rank in p]
                                            for p in peaks[start, way]] for start in STARTS for way in WAYS[start]},
    })


if __name__ == "__main__":
    main()
