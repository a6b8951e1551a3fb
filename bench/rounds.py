"""The order in which a benchmark's contenders run in each round.

Every bench here times its ways (contenders) in rounds, on the same inputs, and reports medians. Within a round
the one that runs first meets a colder cache, a clock still ramping up or the garbage of the one before: run
always in one order, that favours or penalises the same way in every round. So the order flips every round.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def round_order(ways: Sequence[T], round_index: int) -> Sequence[T]:
    """The ways in the order of round `round_index`: as listed in even rounds, reversed in odd ones."""
    return ways if round_index % 2 == 0 else ways[::-1]
