"""How often a finished 2-process gloo torchrun fails in the interpreter's teardown, by how its processes end.

Each run is `torchrun --nproc_per_node 2` of a script that trains one FSDP2 step of four linear layers on gloo,
all-reduces a tensor and destroys the process group: work that succeeded. With torch 2.14 a process sometimes
aborts after that, at interpreter exit ("terminate called without an active exception", SIGABRT), and torchrun
fails. The two ways end the script's processes differently:

    exit       as any Python program ends (the interpreter's teardown)
    end        `fusion.distributed.end_torchrun_process(0)`, as `fusion train` ends under torchrun

In every round the two ways run at the same time (each loads the 2 cores for the other: the abort shows on a
busy machine, seldom on an idle one). Reported: the runs and the failed runs of each way, with the failing
line of each failure.

    python bench/torchrun_exit.py                # 40 rounds (~7 minutes on 2 cores)
    python bench/torchrun_exit.py --rounds 80 --json out.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arguments import bench_parser, print_results  # noqa: E402

WAYS = ("exit", "end")

ONE_STEP = """
import sys
import torch
import torch.distributed as dist
from fusion.distributed import apply_fsdp2, end_torchrun_process, init_distributed, shutdown_distributed

ctx = init_distributed("cpu")
torch.manual_seed(0)
blocks = [torch.nn.Linear(64, 64) for _ in range(4)]
model = apply_fsdp2(torch.nn.Sequential(*blocks), blocks, ctx)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(8, 64)).sum().backward()
optimizer.step()
total = torch.ones(1)
dist.all_reduce(total)
shutdown_distributed()
if sys.argv[1] == "end":
    end_torchrun_process(0)
"""


def start(script: str, way: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, way], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def failing_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines()]
    return next((line for line in lines if "terminate called" in line or "Signal" in line),
                next((line for line in reversed(lines) if line), ""))


def parse_arguments(argv=None) -> argparse.Namespace:
    return bench_parser(__doc__, rounds=40).parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    failures = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "one_step.py")
        with open(script, "w") as f:
            f.write(ONE_STEP)
        for r in range(args.rounds):
            running = {way: start(script, way) for way in WAYS}
            for way, run in running.items():
                output, _ = run.communicate(timeout=600)
                if run.returncode != 0:
                    failures[way].append(f"round {r}: {failing_line(output)}")
            print(f"round {r + 1}/{args.rounds}: failed so far " +
                  ", ".join(f"{way} {len(failures[way])}" for way in WAYS), file=sys.stderr, flush=True)
    result = {"torch": torch.__version__, "cpus": os.cpu_count(), "rounds": args.rounds,
              "failed": {way: len(failures[way]) for way in WAYS}, "failures": failures}
    return print_results(result, args.json)


if __name__ == "__main__":
    main()
