"""Batching processed samples: padding (right for training, left for generation) or packing several
samples into one row with per-sample attention and positions that restart at each sample."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    labels: torch.Tensor | None = None  # [B, T], -100 = not supervised
    positions: torch.Tensor | None = None  # [B, T], only when packed
    segment_ids: torch.Tensor | None = None  # [B, T], only when packed (padding has its own segment)
    pixel_values: torch.Tensor | None = None  # [n_tiles, 3, S, S] in the order the placeholders appear
    sample_ids: list[Any] = field(default_factory=list)

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return Batch(**moved)

    def model_inputs(self) -> dict:
        """Keyword arguments for `FusionModel.forward`."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "positions": self.positions, "segment_ids": self.segment_ids, "pixel_values": self.pixel_values}


def _pixels(samples) -> torch.Tensor | None:
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    return torch.cat(tiles) if tiles else None


def pad_batch(samples: Sequence, pad_id: int, padding_side: str = "right") -> Batch:
    """Pad samples (objects with `input_ids`, `labels`, `pixel_values`) to the longest one."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    width = max(len(s.input_ids) for s in samples)
    B = len(samples)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    with_labels = all(s.labels is not None for s in samples)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, cols] = s.input_ids
        mask[row, cols] = 1
        if labels is not None:
            labels[row, cols] = s.labels
    return Batch(ids, mask, labels, pixel_values=_pixels(samples), sample_ids=[s.sample_id for s in samples])


def pack_batch(samples: Sequence, pad_id: int, max_length: int) -> Batch:
    """Greedily pack samples (in order) into rows of at most `max_length` tokens.

    Each sample keeps its own positions (restarting at 0) and segment id, so packed samples never
    attend to each other; the row's padding is masked out. A sample longer than `max_length` gets a
    row of its own.
    """
    rows: list[list] = []
    for s in samples:
        if rows and sum(len(x.input_ids) for x in rows[-1]) + len(s.input_ids) <= max_length:
            rows[-1].append(s)
        else:
            rows.append([s])
    width = max(sum(len(x.input_ids) for x in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    segments = torch.full((B, width), -1, dtype=torch.long)
    ordered = []
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            n = len(s.input_ids)
            ids[r, start:start + n] = s.input_ids
            mask[r, start:start + n] = 1
            labels[r, start:start + n] = s.labels
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = k
            start += n
            ordered.append(s)
    return Batch(ids, mask, labels, positions, segments, _pixels(ordered), [s.sample_id for s in ordered])
