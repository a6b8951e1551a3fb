"""A training stage's data: its dataset files as one dataset, the sampler that deals each process its share
of every global batch (resumable at any step), and the collation of a micro-batch."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch.utils.data import ConcatDataset, Sampler

from .. import distributed as fdist
from ..decoder import IGNORE_INDEX
from ..errors import ConfigError, DatasetError
from ..train_config import DataSource, StageConfig, TrainConfig
from .collate import Batch, pack_batch, pad_batch
from .datasets import ConversationDataset, MediaCache, _group_key, _system_turn, join_media_groups

if TYPE_CHECKING:
    from ..model import FusionModel


class StageBatches(Sampler):
    """This process's share of each global batch, in a seeded order; resumable at (epoch, batch).

    Epoch e visits the samples in `randperm(n, seed + 1000 * stage + e)`; global batch b is
    positions [b*B, (b+1)*B) of it (the last partial batch of an epoch is dropped); process r of W
    takes the r-th of W equal slices. The same global batches in one process or many.
    """

    def __init__(self, num_samples: int, batch_size: int, ctx: fdist.DistContext, seed: int, stage_index: int,
                 start_epoch: int = 0, start_batch: int = 0):
        if batch_size % ctx.world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {ctx.world_size} processes")
        if num_samples < batch_size:
            raise DatasetError(f"the stage's data has {num_samples} samples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.ctx = num_samples, batch_size, ctx
        self.seed, self.stage_index = seed, stage_index
        self.epoch, self.batch = start_epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        share = self.batch_size // self.ctx.world_size
        while True:
            g = torch.Generator().manual_seed(self.seed + 1000 * self.stage_index + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            while self.batch < self.batches_per_epoch:
                start = self.batch * self.batch_size + self.ctx.rank * share
                self.batch += 1
                yield order[start:start + share]
            self.epoch, self.batch = self.epoch + 1, 0


def load_stage_data(config: TrainConfig, stage: StageConfig, model: FusionModel, files=None,
                    media_cache: MediaCache | None = None):
    """The stage's training data (or `files`: paths or `DataSource`s): each entry's kept records (its `types`,
    `media`; media paths relative to its `root`), `repeat` times over; with `media_cache`, samples and media are
    kept in memory."""
    sources = [f if isinstance(f, DataSource) else DataSource(str(f)) for f in files] if files else stage.data
    datasets = [ConversationDataset(config.path(s.path), model.processor, root=config.path(s.root),
                                    group_by_media=stage.group_by_media,
                                    cache=media_cache is not None, media_cache=media_cache, types=s.types,
                                    media=s.media)
                for s in sources]
    if stage.join_files and len(datasets) > 1:  # one sample per medium, whichever files ask about it
        check_joinable(stage, datasets, sources)
        join_media_groups(datasets)  # moves records between the datasets; one left empty is left out below
    parts = [d for d, s in zip(datasets, sources) for _ in range(s.repeat) if d.records]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def check_joinable(stage: StageConfig, datasets, sources) -> None:
    """`ConfigError` for data entries that `join_files` would join wrongly: a joined sample holds every file's
    questions about its medium and comes `repeat` times as its first file's entry does, so two entries that
    ask about the same medium must have the same `repeat`, and no record may be in two entries (e.g. a file
    listed again with a `media` or `repeat` of its own: its questions would be asked twice in one sample)."""
    where = f"stage {stage.name!r}: join_files"
    held: dict[tuple[str, int], int] = {}
    keys = []
    for k, dataset in enumerate(datasets):
        keys.append({})
        for record in dataset.source_records:
            key = _group_key(record)
            if key is None:  # shows no single medium: never joined
                continue
            keys[-1].setdefault((key, _system_turn(record)), record)
            found = held.setdefault((os.path.realpath(dataset.path), record.line), k)
            if found != k:
                raise ConfigError(
                    f"{where}: data entries {found + 1} ({sources[found].path}) and {k + 1} ({sources[k].path}) both "
                    f"hold record {record.id!r} of {dataset.path} ({dataset.where(record.line)}); joined, it would "
                    f"be asked twice in one sample. Keep each record in one entry (select with types/media, give a "
                    f"file more passes with repeat), or set join_files: false")
    for i in range(len(datasets)):
        for j in range(i + 1, len(datasets)):
            shared = keys[i].keys() & keys[j].keys()
            if shared and sources[i].repeat != sources[j].repeat:
                record = keys[j][next(iter(shared))]
                raise ConfigError(
                    f"{where}: {sources[i].path} (repeat {sources[i].repeat}) and {sources[j].path} (repeat "
                    f"{sources[j].repeat}) ask about the same media (e.g. record {record.id!r}, "
                    f"{record.media[0]}), and a joined sample has one repeat; give them the same repeat, or set "
                    f"join_files: false")


def collate_samples(samples, pad_id: int, pack: bool, max_length: int) -> Batch | None:
    """One micro-batch of the samples that could be read (None for those that could not): padded, or packed
    into rows of at most `max_length` tokens; None when none could be read."""
    good = [s for s in samples if s is not None]
    if not good:
        return None
    return pack_batch(good, pad_id, max_length) if pack else pad_batch(good, pad_id)


def text_stand_in_batch(tokenizer) -> Batch:
    """Two tokens, the second supervised: what a process with no data of its own runs (its result unused) so
    that its collectives match the other processes' under FSDP2."""
    ids = torch.tensor([[tokenizer.bos_id, tokenizer.eos_id]])
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids),
                 labels=torch.tensor([[IGNORE_INDEX, tokenizer.eos_id]]))
