"""How often a finished 2-process gloo torchrun fails in the interpreter's teardown, by how its processes end.

Each run is `torchrun --nproc_per_node 2` of a script that trains one FSDP2 step of four linear layers on gloo,
all-reduces a tensor and destroys the process group: work that succeeded. With torch 2.14 a process sometimes
aborts after that, at interpreter exit ("terminate called without an active exception", SIGABRT), and torchrun
fails. The two ways end the script's processes differently:

    exit       as any Python program ends (the interpreter's teardown)
    end        `fusion.distributed.end_torchrun_process(0)`, as `fusion train` ends under torchrun

The two ways run side by side, each its `--rounds` runs one after another (each loads the 2 cores for the
other, at every phase of its runs: the abort shows on a busy machine, seldom on an idle one). Reported: the
runs of each way and their failures, with the failing line of each.

    python bench/torchrun_exit.py                # 40 runs of each way (~15 minutes on 2 cores)
    python bench/torchrun_exit.py --rounds 80 --json out.json
    python bench/torchrun_exit.py --shared-port  # torchrun's static rendezvous (port 29500) instead of --standalone

The abort is rare and comes in bursts: a run of this bench may show none (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arguments import bench_parser, print_results  # noqa: E402

WAYS = ("exit", "end")

ONE_STEP = """
import sys
import torch
import torch.distributed as dist

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import fully_shard

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
for layer in model:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(8, 64)).sum().backward()
optimizer.step()
total = torch.ones(1)
dist.all_reduce(total)
dist.destroy_process_group()
if sys.argv[1] == "end":
    from fusion.distributed import end_torchrun_process

    end_torchrun_process(0)
"""


def start(script: str, way: str, shared_port: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    rendezvous = [] if shared_port else ["--standalone"]  # (without it: torchrun's static rendezvous, port 29500)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc_per_node", "2",
                             script, way], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def failing_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines()]
    return next((line for line in lines if "terminate called" in line or "Signal" in line),
                next((line for line in reversed(lines) if line), ""))


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = bench_parser(__doc__, rounds=40)
    parser.add_argument("--shared-port", action="store_true",
                        help="start each torchrun with its default static rendezvous (port 29500, so the two ways' "
                             "runs side by side share it) instead of --standalone (a free port each)")
    return parser.parse_args(argv)


def runs_of(way: str, script: str, runs: int, failures: list[str], shared_port: bool) -> None:
    """`runs` torchruns ending `way`, one after another; the failing line of each failure added to `failures`."""
    for r in range(runs):
        run = start(script, way, shared_port)
        output, _ = run.communicate(timeout=600)
        if run.returncode != 0:
            failures.append(f"run {r + 1}: {failing_line(output)}")
        print(f"{way}: run {r + 1}/{runs}, {len(failures)} failed so far", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_arguments(argv)
    failures = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "one_step.py")
        with open(script, "w") as f:
            f.write(ONE_STEP)
        threads = [threading.Thread(target=runs_of, args=(way, script, args.rounds, failures[way], args.shared_port))
                   for way in WAYS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = {"torch": torch.__version__, "cpus": os.cpu_count(), "runs_per_way": args.rounds,
              "shared_port": args.shared_port, "failed": {way: len(failures[way]) for way in WAYS},
              "failures": failures}
    return print_results(result, args.json)


if __name__ == "__main__":
    main()
