"""Batching processed samples: padding (right for training, left for generation), packing several
samples into one row with per-sample attention and positions that restart at each sample, and
sharing a common prefix (one image, several questions) between branches of one sample."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    labels: torch.Tensor | None = None  # [B, T], -100 = not supervised
    positions: torch.Tensor | None = None  # [B, T], when packed or branched
    segment_ids: torch.Tensor | None = None  # [B, T], when packed (padding has its own segment)
    pixel_values: torch.Tensor | None = None  # [n_tiles, 3, S, S] in the order the placeholders appear
    sample_ids: list[Any] = field(default_factory=list)
    branch_ids: torch.Tensor | None = None  # [B, T], when a sample shares a prefix between branches

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return type(self)(**moved)

    def model_inputs(self) -> dict:
        """Keyword arguments for `FusionModel.forward`."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "positions": self.positions, "segment_ids": self.segment_ids, "branch_ids": self.branch_ids,
                "pixel_values": self.pixel_values}


def share_prefix(samples: Sequence, patch_id: int):
    """Several samples that start with the same tokens -> one sample holding that prefix once.

    For one image with several questions: the prefix (begin of text, user header, the image's
    placeholders) is computed once, and each sample's remainder becomes a branch that attends to the
    prefix and to itself only, at the positions it would have on its own. Each branch therefore gets
    exactly the attention, positions and loss it would get as a separate sample. The image is encoded
    once.

    Labels are not shifted (the model predicts token t + 1 from position t), so the first token of a
    branch after the first is never a target (it would be predicted from the end of another branch),
    and a prefix token's label would count once for all samples. The prefix therefore ends before the
    first supervised token of the first sample and one token before that of every other sample: when
    samples agree into their answers (the same question asked again with another answer, several
    captions under one prompt), the common answer tokens stay in each branch, and the summed token
    loss equals that of the samples apart.

    Image placeholders are never split: if a sample's own remainder holds images too, the prefix
    ends before the first image and every branch keeps its own pixels.
    """
    if len(samples) == 1:
        return samples[0]
    first = samples[0]
    shared = min(len(s.input_ids) for s in samples) - 1  # every branch keeps at least one token
    for s in samples[1:]:
        differ = (s.input_ids[:shared] != first.input_ids[:shared]).nonzero()
        if len(differ):
            shared = int(differ[0])
    for k, s in enumerate(samples):  # no supervised token in the prefix, nor first in a later branch
        if s.labels is not None:
            supervised = (s.labels != IGNORE_INDEX).nonzero()
            if len(supervised):
                shared = min(shared, int(supervised[0]) - (1 if k else 0))
    shared = max(shared, 0)
    in_prefix = bool((first.input_ids[:shared] == patch_id).any())
    in_branches = any(bool((s.input_ids[shared:] == patch_id).any()) for s in samples)
    if in_prefix and in_branches:
        shared = int((first.input_ids == patch_id).nonzero()[0])
        in_prefix = False
    ids, labels, positions, branches = [first.input_ids[:shared]], [], [torch.arange(shared)], [torch.zeros(shared)]
    labels.append(first.labels[:shared] if first.labels is not None else torch.full((shared,), IGNORE_INDEX))
    for k, s in enumerate(samples, start=1):
        rest = s.input_ids[shared:]
        ids.append(rest)
        rest_labels = (s.labels[shared:] if s.labels is not None else torch.full_like(rest, IGNORE_INDEX)).clone()
        if k > 1:
            rest_labels[0] = IGNORE_INDEX
        labels.append(rest_labels)
        positions.append(torch.arange(shared, shared + len(rest)))
        branches.append(torch.full((len(rest),), k))
    if in_prefix:
        pixels = first.pixel_values
    else:
        tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
        pixels = torch.cat(tiles) if tiles else None
    return dataclasses.replace(first, input_ids=torch.cat(ids), labels=torch.cat(labels), pixel_values=pixels,
                               positions=torch.cat(positions), branch_ids=torch.cat(branches).long(),
                               sample_id=[s.sample_id for s in samples])


def split_branches(sample, max_tokens: int, patch_id: int) -> list:
    """A shared-prefix sample longer than `max_tokens` -> several samples, each with the prefix and some of
    its branches (in order, as many as fit; a branch too long for any row gets a row of its own).

    Each branch keeps its tokens, labels, positions and branch id, and sees the prefix and itself as
    before, so the summed token loss and its gradients are the same; only the prefix (and its image or
    frames) is computed once per row, and so counted once per row in the router-load statistics (the MoE
    balancing bias, an auxiliary loss if one is set). What that buys: attention scores grow with the square
    of a row's length, and one long row pads every row of its batch to its length. A sample that is short
    enough, has no branches, or whose branches hold images of their own comes back as it is.
    """
    if max_tokens < 1:
        raise ValueError(f"split_branches: max_tokens must be >= 1, got {max_tokens}")
    branch_ids = getattr(sample, "branch_ids", None)
    if branch_ids is None or len(sample.input_ids) <= max_tokens:
        return [sample]
    prefix = int((branch_ids == 0).sum())
    if bool((sample.input_ids[prefix:] == patch_id).any()):
        return [sample]
    changes = torch.nonzero(branch_ids[prefix + 1:] != branch_ids[prefix:-1]).flatten() + prefix + 1
    starts = [prefix] + changes.tolist()
    spans = list(zip(starts, starts[1:] + [len(branch_ids)]))
    rows, length = [[]], prefix
    for start, end in spans:
        if rows[-1] and length + end - start > max_tokens:
            rows.append([])
            length = prefix
        rows[-1].append((start, end))
        length += end - start
    if len(rows) == 1:
        return [sample]
    ids = list(sample.sample_id) if isinstance(sample.sample_id, (list, tuple)) else None
    out = []
    for row in rows:
        keep = torch.cat([torch.arange(prefix)] + [torch.arange(s, e) for s, e in row])
        out.append(dataclasses.replace(
            sample, input_ids=sample.input_ids[keep], labels=sample.labels[keep] if sample.labels is not None else None,
            positions=sample.positions[keep], branch_ids=branch_ids[keep],
            sample_id=[ids[int(branch_ids[s]) - 1] for s, _ in row] if ids is not None else sample.sample_id))
    return out


def split_long_samples(samples: Sequence, max_tokens: int, patch_id: int) -> list:
    """`split_branches` over a micro-batch: its samples (None, a bad sample, left out) as rows of at most
    `max_tokens` where a shared prefix allows."""
    return [row for s in samples if s is not None for row in split_branches(s, max_tokens, patch_id)]


def _pixels(samples) -> torch.Tensor | None:
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    return torch.cat(tiles) if tiles else None


def _positions_and_branches(s) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(s.input_ids)
    positions = s.positions if s.positions is not None else torch.arange(n)
    branches = s.branch_ids if s.branch_ids is not None else torch.zeros(n, dtype=torch.long)
    return positions, branches


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
    branched = any(s.branch_ids is not None for s in samples)
    if branched and padding_side == "left":
        raise ValueError("shared-prefix samples are for training; pad them on the right")
    positions = torch.zeros((B, width), dtype=torch.long) if branched else None
    branch_ids = torch.full((B, width), -1, dtype=torch.long) if branched else None
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, cols] = s.input_ids
        mask[row, cols] = 1
        if labels is not None:
            labels[row, cols] = s.labels
        if branched:
            positions[row, cols], branch_ids[row, cols] = _positions_and_branches(s)
    return Batch(ids, mask, labels, positions=positions, pixel_values=_pixels(samples),
                 sample_ids=[s.sample_id for s in samples], branch_ids=branch_ids)


def pack_batch(samples: Sequence, pad_id: int, max_length: int) -> Batch:
    """Greedily pack samples (in order) into rows of at most `max_length` tokens.

    Each sample keeps its own positions (restarting at 0) and segment id, so packed samples never
    attend to each other; the row's padding is masked out. A sample longer than `max_length` gets a
    row of its own. A sample's first token is never a target (labels are shifted inside the model, so
    it would be predicted from the last token of the sample before it), as when padded.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if max_length is None or max_length < 1:
        raise ValueError(f"pack_batch: max_length (the tokens per packed row) must be >= 1, got {max_length}")
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
    with_labels = all(s.labels is not None for s in samples)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    positions = torch.zeros((B, width), dtype=torch.long)
    segments = torch.full((B, width), -1, dtype=torch.long)
    branched = any(s.branch_ids is not None for s in samples)
    branch_ids = torch.full((B, width), -1, dtype=torch.long) if branched else None
    ordered = []
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            n = len(s.input_ids)
            cols = slice(start, start + n)
            ids[r, cols] = s.input_ids
            mask[r, cols] = 1
            if labels is not None:
                labels[r, cols] = s.labels
                labels[r, start:start + 1] = IGNORE_INDEX  # not a target of the previous sample's last token
            positions[r, cols], sample_branches = _positions_and_branches(s)
            if branched:
                branch_ids[r, cols] = sample_branches
            segments[r, cols] = k
            start += n
            ordered.append(s)
    return Batch(ids, mask, labels, positions, segments, _pixels(ordered), [s.sample_id for s in ordered],
                 branch_ids=branch_ids)


def split_by_length(samples: Sequence, groups: int) -> list[list]:
    """Split `samples` into at most `groups` groups of similar length, with the fewest padded tokens.

    Padding a batch costs every row the longest row's length; a batch of short image samples and long
    video samples pads the short ones heavily. Here the samples are sorted by length and cut into
    contiguous runs so that the sum over groups of (rows x longest row) is smallest (an exact dynamic
    program). Summing the token losses of the groups gives the same loss as the one padded batch.
    """
    if groups < 1:
        raise ValueError(f"split_by_length: groups must be >= 1, got {groups}")
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    n = len(ordered)
    groups = min(groups, n)
    if groups <= 1:
        return [list(ordered)] if ordered else []
    lengths = [len(s.input_ids) for s in ordered]
    inf = float("inf")
    # best[g][i]: fewest padded tokens for the first i samples in g groups; cut[g][i]: where the last group starts
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        for i in range(1, n + 1):
            for j in range(g - 1, i):
                cost = best[g - 1][j] + (i - j) * lengths[i - 1]
                if cost < best[g][i]:
                    best[g][i], cut[g][i] = cost, j
    g = min(range(1, groups + 1), key=lambda k: (best[k][n], k))  # fewest groups among the cheapest
    out, end = [], n
    while g > 0:
        start = cut[g][end]
        out.append(list(ordered[start:end]))
        end, g = start, g - 1
    return out[::-1]
