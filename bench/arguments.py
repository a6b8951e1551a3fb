"""Checks of the benches' command lines, shared by every bench here.

A bad value should stop a bench at once with a message that names the option and says what to give, not after
minutes of work with a traceback. The argparse types below do that while the command line is parsed (argparse
prints `argument --rounds: ...` and exits); `draw_batches` does it where a bench first knows how many samples
it draws its batches from.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Sequence, TypeVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, as the benches do
from fusion.cli import whole_number  # noqa: E402

T = TypeVar("T")

positive_int = whole_number(1)  # rounds, batch size, threads, ...
non_negative_int = whole_number(0)  # warm-up rounds, where none is a choice


def bench_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """A bench's command line with the options every bench has: --rounds (default `rounds`) and --json; a bench
    adds its own to it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    parser.add_argument("--json", type=json_output_path, help="also write the results to this file")
    return parser


def print_results(result, json_path: str | None):
    """`result` printed as JSON, and written to `json_path` (the --json file) if given; returns it."""
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def json_output_path(text: str) -> str:
    """argparse type: a file path whose folder exists and is writable, checked before the bench runs
    (the results are written there only at the end)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name (e.g. {os.path.join(text, 'results.json')})")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist: create it first or write the "
                                         "results elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder} is not writable: write the results elsewhere")
    return text


def draw_batches(population: Sequence[T], batch_size: int, count: int, what: str = "samples") -> list[list[T]]:
    """`count` batches of `batch_size` distinct items of `population` (`random.sample` each, so the draws are
    the very ones a bench made before this check). Stops with a message naming --batch-size if the batch
    is larger than `population`."""
    if batch_size > len(population):
        raise SystemExit(f"--batch-size {batch_size} is more than the {len(population)} {what} the bench draws "
                         f"its batches from: give --batch-size {len(population)} or less")
    return [random.sample(population, batch_size) for _ in range(count)]
