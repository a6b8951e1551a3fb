"""Checks of the benches' command lines, shared by every bench here.

A bad value should stop a bench at once with a message that names the option and says what to give, not after
minutes of work with a traceback. The argparse types below do that while the command line is parsed (argparse
prints `argument --rounds: ...` and exits); `draw_batches` does it where a bench first knows how many samples
it draws its batches from.
"""
from __future__ import annotations

import argparse
import os
import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more (rounds, batch size, threads, ...)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1: give 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of 0 or more (warm-up rounds, where none is a choice)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 or more")
    return value


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
