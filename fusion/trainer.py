"""Staged training: `fusion train CONFIG.yaml [--resume]`, or `fusion.trainer.train(config)` from Python.

Each stage trains the parts with a positive learning rate and freezes the others (no gradients, eval
mode, not in the optimizer; a frozen vision tower builds no autograd graph). One optimizer step sees
`batch_size` samples over all processes and accumulation steps; the loss is the mean over all of
their supervised tokens, computed the same way in one process or many, so a 2-process run follows
a 1-process run with the same global batch.

Resumable checkpoints (model, optimizer, schedule, RNG states, data position) are written atomically
every `checkpoint_every` steps; `--resume` continues from the latest one exactly where it stopped.

The pieces a run is made of live beside it: `stage_setup` (the model, its trainable parts, the optimizer and
schedule), `data.stage_data` (a stage's dataset and sampler), `training_step` (the loss), `stop_signals`
(SIGTERM / Ctrl-C), `checkpoint`, `run_log` (metrics and plot), `distributed` (DDP, FSDP2).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import time
import warnings
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed as fdist
from .checkpoint import (StreamedState, atomic_folder, check_model_folder, load_model_folder, model_folder,
                         read_model_config, read_model_weights, remove_stale_temporaries, save_model_folder,
                         write_json, write_torch_file)
from .compilation import check_can_compile, compile_decoder_blocks, eager
from .data.collate import split_by_length, split_long_samples
from .data.datasets import ConversationDataset, MediaCache
from .data.stage_data import StageBatches, collate_samples, load_stage_data, text_stand_in_batch
from .decoder import IGNORE_INDEX
from .errors import CheckpointError, ConfigError, DatasetError, TrainingError, TrainingStopped, WeightsError
from .hf_llama4 import open_hf_decoder_weights
from .model import FusionModel
from .precision import computed_in, has_native_bf16
from .run_log import MetricsLog, plot_metrics
from .stage_setup import build_model, build_optimizer, check_model_section, lr_multiplier, set_trainable
from .stop_signals import StopSignals, ignore_stop_signals
from .train_config import PARTS, StageConfig, TrainConfig, load_train_config
from .training_step import TrainingStep, supervised_loss_sum

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_STATE = "optimizer"  # a checkpoint's optimizer state: a torch.distributed.checkpoint folder


@dataclass
class StageProgress:
    stage_index: int = 0
    step: int = 0  # optimizer steps done in this stage
    global_step: int = 0  # optimizer steps done in the run


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False):
        self.config = config
        self.out = config.path(config.output_dir)
        if resume and overwrite:
            raise ConfigError("resume and overwrite exclude each other: continue the run, or start it again")
        found = None if resume else run_in(self.out)
        if found and not overwrite:
            raise ConfigError(f"output_dir {str(self.out)!r} already holds a run ({found}); continue it with "
                              f"--resume (train(..., resume=True)), start again over it with --overwrite "
                              f"(overwrite=True), or give another output_dir")
        self.overwrite = bool(found)
        self.ctx = fdist.init_distributed(config.device)
        self.progress = progress and self.ctx.is_main
        if config.threads:
            torch.set_num_threads(config.threads)
        self.resume_state = self._latest_state() if resume else None
        if resume and self.resume_state is None:
            if (self.out / "final").exists():  # a finished run whose checkpoints were deleted: not silently redone
                raise ConfigError(f"--resume: output_dir {str(self.out)!r} holds a finished run (its final model) "
                                  f"but no checkpoint to continue from in {self.out / 'checkpoints'}; train it again "
                                  f"with --overwrite (overwrite=True), or give another output_dir")
            if self.ctx.is_main:
                print(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from the beginning")
        self.strategy = config.distributed.get("strategy", "ddp")
        self.autocast_dtype = self._autocast_dtype()
        self.started = time.perf_counter()
        # wall time of the run before the checkpoint it resumes from (earlier invocations, lost work excluded);
        # None where that checkpoint does not say (written by an older fusion)
        self.seconds_before = self.resume_state.get("wall_seconds") if self.resume_state else 0.0
        self.media_cache = MediaCache()  # decoded media, shared by the stages with cache_samples
        self.model: FusionModel | None = None  # built by `run` (or `check`)
        self.stop_signals = StopSignals()  # SIGTERM / SIGINT: stop after the current step, with a checkpoint
        for stage in config.stages:
            if stage.compile:
                self._check_compile(stage)

    @property
    def sharded(self) -> bool:
        """FSDP2 over several processes: each forward and backward of a sharded module is a collective, so
        every process runs as many micro-batches as the others (stand-ins where it has fewer)."""
        return self.ctx.distributed and self.strategy == "fsdp2"

    @property
    def computed_in(self) -> str:
        return computed_in(self.autocast_dtype is not None)

    def total_wall_seconds(self) -> float | None:
        """The run's wall time so far over all its invocations (None: a resumed checkpoint did not record it)."""
        if self.seconds_before is None:
            return None
        return self.seconds_before + time.perf_counter() - self.started

    # -- setup -------------------------------------------------------------------------------
    def _autocast_dtype(self):
        """bf16 for `precision: bf16`, and for `auto` where the device computes bf16 natively; else None (fp32)."""
        precision = self.config.precision
        if precision == "fp32":
            return None
        native = has_native_bf16(self.ctx.device)
        if precision == "auto":
            return torch.bfloat16 if native else None
        if not native and self.ctx.is_main:
            warnings.warn(f"precision: bf16 on {self.ctx.device}, which has no native bf16 (on a CPU: no AVX512-BF16 "
                          f"or AMX): torch emulates it and training runs many times slower than in float32; "
                          f"use precision: auto (bf16 only where native) or fp32", stacklevel=2)
        return torch.bfloat16

    def _check_compile(self, stage: StageConfig):
        check_can_compile(self.ctx.device, f"stage {stage.name!r}")

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def _latest_state(self):
        """The trainer state of the checkpoint `latest.json` names; if that one cannot be read (a damaged or
        half-copied run folder), the newest readable one, with a warning; None where the run has none."""
        root = self.out / "checkpoints"
        pointer = root / "latest.json"
        if not pointer.exists():
            return None
        folders = sorted(root.glob("step-*"), reverse=True)
        try:
            named = root / json.loads(pointer.read_text())["folder"]
            folders = [named] + [f for f in folders if f != named]
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"{pointer} cannot be read ({err})"
        else:
            problem = None
        for folder in folders:
            try:
                state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False, mmap=True)
                check_model_folder(folder / "model")  # its files there and readable: not cut short by a copy
                if state.get("optimizer_parts"):
                    fdist.check_optimizer_state(folder / OPTIMIZER_STATE)
            except Exception as err:  # a missing, truncated or foreign file
                problem = problem or f"the checkpoint {folder} cannot be read ({type(err).__name__}: {err})"
                continue
            if problem:
                warnings.warn(f"{problem}; resuming from {folder} instead", TrainingWarning, stacklevel=2)
            state["folder"] = folder
            return state
        raise CheckpointError(f"{problem}, and no other checkpoint in {root} can be read; start the run again with "
                              f"--overwrite")

    def _shapes_world_settings(self):
        """(out_dir, the wanted ShapesWorldConfig, {setting: (found, wanted)} of a world already there or None
        where there is none); a world written with other settings than the extras' is refused: a run never
        trains on it without saying so."""
        from .data.shapes_world import TRAIN_EXTRA_SETTINGS, ShapesWorldConfig, world_settings_in

        spec = dict(self.config.data["shapes_world"])
        out_dir = self.config.path(spec.pop("out_dir"))
        wanted = ShapesWorldConfig(**spec)
        found = world_settings_in(out_dir)
        if found is None:
            return out_dir, wanted, None
        differ = {k: (found[k], v) for k, v in wanted.to_dict().items() if found[k] != v}
        if differ and not set(differ) <= set(TRAIN_EXTRA_SETTINGS):
            raise ConfigError(f"data.shapes_world: {out_dir} holds a shapes world generated with other settings "
                              f"(found vs wanted: {differ}); delete that folder to regenerate it, or give "
                              f"another out_dir")
        return out_dir, wanted, differ

    def prepare_data(self):
        spec = self.config.data.get("shapes_world")
        if not spec:
            return
        from .data.shapes_world import generate_shapes_world, rewrite_train_extra

        out_dir, wanted, differ = self._shapes_world_settings()
        if differ:  # only the extras' settings differ: train_extra.jsonl (and its images) is written again
            if self.ctx.is_main:
                rewrite_train_extra(out_dir, wanted)
        elif differ is None and self.ctx.is_main:
            if self.progress:
                print(f"generating the shapes world in {out_dir} ...", flush=True)
            generate_shapes_world(out_dir, wanted)
        self.ctx.barrier()

    def seed_everything(self, seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> Path:
        config = self.config
        started = time.perf_counter()
        resumed = self.resume_state is not None
        check_model_section(config)  # before the shapes world is generated (minutes) or anything else runs
        self.prepare_data()
        progress = self._starting_progress()
        self._check_files(progress.stage_index)
        self.seed_everything(config.seed)
        self.model = self._starting_model()
        for stage in [*config.stages[progress.stage_index:], None]:  # each eval's data (the final one's last)
            self._check_eval_data(stage)                             # readable, before any training
        self._check_resumable(progress)
        if self.overwrite and self.ctx.is_main:  # only once the config passed every check above: a mistake in it
            self._remove_earlier_run()           # leaves the earlier run as it was
        if self.ctx.is_main:
            self._remove_stale_temporaries()
        self.ctx.barrier()
        self.log = MetricsLog(self.out / "metrics.jsonl",
                              resume_from_step=progress.global_step if self.resume_state else None) \
            if self.ctx.is_main else None
        if self.ctx.is_main:
            if self.resume_state is not None:
                self._warn_about_config_changes(progress.stage_index)
            write_json(self.out / "train_config.json", config.to_dict())
            print(f"training on {self.ctx.device} in {self.computed_in} (precision: {config.precision})", flush=True)
        steps_before = progress.global_step
        with self.stop_signals:  # while the stages train (not while data is generated or the final eval runs)
            for index, stage in enumerate(config.stages):
                if index < progress.stage_index:
                    continue
                resuming = self.resume_state is not None and index == progress.stage_index and progress.step > 0
                if stage.init_from and not resuming:
                    self.model = self._model_from_folder(model_folder(stage.init_from, config.base_dir))
                progress = self.run_stage(index, stage, progress, resuming)
                progress = StageProgress(index + 1, 0, progress.global_step)
                self.resume_state = None
                if index + 1 < len(config.stages) and self.stop_signals.agreed(self.ctx):  # its end is checkpointed
                    raise self.stopped(stage, progress)
        if resumed and progress.global_step == steps_before and self.ctx.is_main:
            print(f"--resume: every stage of this run had finished (run step {steps_before}): nothing was trained; "
                  f"its final model is written and evaluated again", flush=True)
        final = self.out / "final"
        self.save_model(final)  # (its last collective but for a sharded final evaluation: without FSDP2 only the
        if not self.ctx.is_main:  # main process works after it, so a long final evaluation never outlasts a
            self.final_eval(final)  # collective's timeout in the others)
            return final
        try:
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png")
        except Exception as err:  # a plot is not worth the final evaluation and the run's summary
            warnings.warn(f"could not plot {self.out / 'metrics.jsonl'} to metrics.png ({type(err).__name__}: "
                          f"{err}); the log itself is complete", TrainingWarning, stacklevel=2)
        self.final_eval(final)
        total = self.total_wall_seconds()
        write_json(self.out / "run_summary.json", {
            "wall_seconds": round(time.perf_counter() - started, 1),
            "resumed": resumed,  # True: wall_seconds covers only the part after the last --resume
            # ... and this adds the time up to the checkpoint it resumed from (all earlier parts)
            "wall_seconds_total": None if total is None else round(total, 1),
            "steps": progress.global_step, "device": str(self.ctx.device), "world_size": self.ctx.world_size,
            "computed_in": self.computed_in,
            "threads": torch.get_num_threads(), "torch": torch.__version__})
        return final

    def _remove_earlier_run(self):
        """--overwrite: the earlier run's files only (the folder may hold the user's own)."""
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _remove_stale_temporaries(self):
        """The hidden copies that a run killed while writing a checkpoint or a model (SIGKILL, a power cut) left
        in its folders (`.step-0000400.tmp-x1y2`: a checkpoint's size each); only those named as the run names
        them are removed, with a line saying so."""
        stages = "|".join(re.escape(stage.name) for stage in self.config.stages)
        models = [self.out / "final"] + [self.out / "stages" / stage.name for stage in self.config.stages]
        for folder, names in ((self.out / "checkpoints", r"step-\d+|latest\.json"), (self.out / "stages", stages),
                              (self.out, "|".join(re.escape(name) for name in RUN_FILES)),
                              *((model, None) for model in models)):
            removed = remove_stale_temporaries(folder, names)
            if removed:
                print(f"removed {len(removed)} temporary cop{'ies' if len(removed) > 1 else 'y'} that an interrupted "
                      f"write left in {folder}: {', '.join(removed)}", flush=True)

    def _warn_about_config_changes(self, first_stage: int):
        """--resume with a config that differs from the run's saved one: say what changed (a longer stage may be
        meant; another batch size or data changes what the remaining steps see), and which changes concern
        stages the run has finished (those are not trained again)."""
        saved_file = self.out / "train_config.json"
        if not saved_file.is_file():
            return
        saved = json.loads(saved_file.read_text())
        current = json.loads(json.dumps(self.config.to_dict()))  # the same JSON types as the saved one
        saved.pop("base_dir", None), current.pop("base_dir", None)
        changes = config_changes(saved, current)
        finished = tuple(f"stages[{i}]" for i in range(first_stage))
        done = [c for c in changes if c.startswith(tuple(f"{prefix}." for prefix in finished))]
        taken = [c for c in changes if c not in done]

        def shown(items):
            return "; ".join(items[:8]) + (f"; and {len(items) - 8} more" if len(items) > 8 else "")

        if taken:
            warnings.warn(f"--resume with a config that differs from the run's ({saved_file}): {shown(taken)}. The "
                          f"run goes on with the new one from its checkpoint", TrainingWarning, stacklevel=2)
        if done:
            names = ", ".join(repr(s.name) for s in self.config.stages[:first_stage])
            warnings.warn(f"--resume: these changes concern stages the run has finished ({names}) and change "
                          f"nothing: {shown(done)}. A finished stage is not trained again (its optimizer state "
                          f"is not kept); to train longer, add a stage (it starts from the model the run has)",
                          TrainingWarning, stacklevel=2)

    def stopped(self, stage: StageConfig, progress: StageProgress) -> TrainingStopped:
        """The exception that ends a run stopped by a signal, after its checkpoint."""
        name = signal.Signals(self.stop_signals.signum).name if self.stop_signals.signum else "a stop request"
        return TrainingStopped(f"stopped on {name} after stage {stage.name!r} step {progress.step} (run step "
                               f"{progress.global_step}); its checkpoint is in {self.out / 'checkpoints'}: continue "
                               f"with `fusion train CONFIG --resume` (train(..., resume=True))",
                               signum=self.stop_signals.signum)

    def run_stage(self, index: int, stage: StageConfig, progress: StageProgress, resuming: bool) -> StageProgress:
        model, ctx = self.model, self.ctx
        set_trainable(model, stage)
        if stage.compile:
            compile_decoder_blocks(model.decoder)
        for moe in model.decoder.moe_layers():
            moe.count_padding = self.config.moe_count_padding
            # the stage's coefficient, else the model's (not an earlier stage's override)
            moe.aux_loss_coef = model.decoder.config.aux_loss_coef if stage.aux_loss_coef is None \
                else stage.aux_loss_coef
        step_module = TrainingStep(model)
        # a micro-batch without media still runs the tower on a blank tile (its result times 0) where the stage
        # trains the tower or adapter and either the decoder is frozen (else the loss has no gradient path at all)
        # or DDP shares gradients (every trained parameter is then used in every forward, so DDP need not look
        # for unused ones); under FSDP2 always, as every process must gather the tower's shards as often
        trains_vision = stage.rate("vision") > 0 or stage.rate("adapter") > 0
        model.vision_in_every_forward = bool(getattr(model, "_fsdp_applied", False)) or trains_vision and (
            stage.rate("decoder") <= 0 or ctx.distributed)
        if self.sharded and not getattr(model, "_fsdp_applied", False):
            self._shard(model)
            model.vision_in_every_forward = True
        wrapped = fdist.wrap_ddp(step_module, ctx) if ctx.distributed and self.strategy == "ddp" else step_module
        optimizer = build_optimizer(model, stage)
        dataset = load_stage_data(self.config, stage, model,
                                  media_cache=self.media_cache if stage.cache_samples else None)
        self._check_training_data(stage, dataset)  # (its files' first samples readable: before the stage's first step)
        total = stage.total_steps(len(dataset))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, total, stage.warmup_steps, stage.min_lr_ratio))
        if resuming:
            self._resume_stage(stage, optimizer, scheduler, len(dataset))
        # one global batch per optimizer step: the data position follows from the step count
        _check_enough_samples(stage, len(dataset))
        sampler = StageBatches(len(dataset), stage.batch_size, ctx, self.config.seed, index)
        sampler.epoch, sampler.batch = divmod(progress.step, sampler.batches_per_epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                            collate_fn=_uncollated, worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        decoder_trains = stage.rate("decoder") > 0
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=progress.step, desc=f"stage {stage.name}", dynamic_ncols=True)
        window = new_window()
        skipped_in_a_row = 0
        while progress.step < total:
            samples = next(batches)
            with eager(not stage.compile):  # blocks compiled by an earlier stage run eagerly in this one
                loss_sum, tokens, stats = self.optimizer_step(wrapped, samples, stage, optimizer)
            skipped_in_a_row = skipped_in_a_row + 1 if stats["skipped"] else 0
            if stats["skipped"]:
                window["skipped_steps"] += 1
                self.skipped_step(stage, progress, samples, skipped_in_a_row, stats["skipped"])
                loss_sum = 0.0  # not averaged into the logged loss
                tokens = 0
            window["lr"] = {g["part"]: g["lr"] for g in optimizer.param_groups}  # the rates this step trained at
            with warnings.catch_warnings():  # torch's "scheduler before optimizer" when the first step was skipped
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                scheduler.step()
            if decoder_trains:
                model.decoder.update_expert_bias()
            progress.step += 1
            progress.global_step += 1
            window["loss"] += loss_sum
            window["tokens"] += tokens
            window["samples"] += stats["samples"]
            window["input_tokens"] += stats["input_tokens"]
            window["padded_tokens"] += stats["padded_tokens"]
            window["dropped"] += stats["dropped"]
            if stats["load"] is not None:  # (None for a step skipped as every sample of it was bad)
                window["load"] = stats["load"] if window["load"] is None else window["load"] + stats["load"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(tokens, 1):.3f}")
            if progress.step % self.config.log_every == 0 or progress.step == total:
                self.log_train(stage, progress, window)
                window = new_window()
            if stage.eval.every and progress.step % stage.eval.every == 0 and progress.step < total:
                self.evaluate(stage, progress)
            every = self.config.checkpoint_every
            stop = progress.step < total and self.stop_signals.agreed(self.ctx)  # SIGTERM / Ctrl-C: keep this step
            if stop or (every and progress.step % every == 0 and progress.step < total):
                self.save_checkpoint(optimizer, scheduler, progress, divmod(progress.step, sampler.batches_per_epoch),
                                     stage_samples=len(dataset))
            if stop:
                raise self.stopped(stage, progress)
        if bar is not None:
            bar.close()
        if stage.eval.data:
            self.evaluate(stage, progress)
        self.save_model(self.out / "stages" / stage.name)
        self.save_checkpoint(None, None, StageProgress(index + 1, 0, progress.global_step), (0, 0))
        return progress

    def _resume_stage(self, stage: StageConfig, optimizer, scheduler, samples: int):
        """Load the checkpoint's optimizer, schedule and RNG states into the stage it stopped in (its model is the
        one the run started with, `_starting_model`). The config's learning rates and weight decay are the ones
        that go on (the same as the checkpoint's unless the config was edited since); a change of which parts
        train cannot continue the optimizer's state."""
        state = self.resume_state
        configured = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        if state.get("optimizer") is not None:  # a checkpoint of fusion before 2026-12-03: the whole state inside
            fdist.load_full_optimizer_state(self.model, optimizer, state["optimizer"])
        else:  # each process reads its part
            fdist.load_optimizer_state(self.model, optimizer, state["folder"] / OPTIMIZER_STATE)
        scheduler.load_state_dict(state["scheduler"])
        scheduler.base_lrs = [rate for rate, _ in configured]
        for group, (rate, decay), multiplier in zip(optimizer.param_groups, configured, scheduler.lr_lambdas):
            group["initial_lr"], group["weight_decay"] = rate, decay
            group["lr"] = rate * multiplier(scheduler.last_epoch)  # as the schedule sets it at each step
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        _set_rng_state(state["rng"])
        saved_samples = state.get("stage_samples")
        if saved_samples is not None and saved_samples != samples and self.ctx.is_main:
            warnings.warn(f"stage {stage.name!r}: --resume with {samples} samples in the stage's data, where the "
                          f"checkpoint's run had {saved_samples}: the rest of this epoch is drawn in a new order "
                          f"(some samples of it seen twice, some not at all)", TrainingWarning, stacklevel=2)

    def _check_resumable(self, progress: StageProgress):
        """--resume in the middle of a stage whose lr now trains other parts: the optimizer's state (one entry
        per trained parameter) cannot go on; said before anything of the run is touched."""
        state = self.resume_state
        saved = _saved_parts(state)
        if saved is None or progress.step == 0:
            return
        stage = self.config.stages[progress.stage_index]
        parts = sorted(name for name, part in self.model.parts().items()
                       if stage.rate(name) > 0 and any(True for _ in part.parameters()))
        if saved != parts:
            raise ConfigError(f"stage {stage.name!r}: --resume from {state['folder']}, where the stage trained "
                              f"{', '.join(saved)}, but its lr now trains {', '.join(parts)}; the optimizer's "
                              f"state cannot go on with other parts: put the stage's lr back, or end the stage "
                              f"there (steps) and add one after it (it starts from the run's model)")

    def optimizer_step(self, wrapped, samples, stage: StageConfig, optimizer):
        """One optimizer step over this process's share of a global batch (split into micro-batches)."""
        ctx = self.ctx
        pad_id = self.model.tokenizer.pad_id
        micro = max(1, math.ceil(len(samples) / stage.grad_accum))
        chunks = [samples[i:i + micro] for i in range(0, len(samples), micro)]
        if stage.max_row_tokens:  # long shared-prefix samples as several rows: the same loss, fewer padded tokens
            chunks = [split_long_samples(c, stage.max_row_tokens, self.model.patch_id) for c in chunks]
        if stage.length_buckets > 1 and not stage.pack:
            chunks = [group for c in chunks for group in split_by_length([s for s in c if s is not None],
                                                                           stage.length_buckets)]
        batches = [collate_samples(c, pad_id, stage.pack, stage.max_length) for c in chunks]
        dropped = sum(s is None for s in samples)
        batches = [b for b in batches if b is not None]
        local_tokens = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        input_tokens = sum(int(b.attention_mask.sum()) for b in batches)
        padded_tokens = sum(b.attention_mask.numel() for b in batches)  # what the model computes, padding included
        counts = ctx.all_reduce_sum(torch.tensor([local_tokens, len(samples) - dropped, dropped, input_tokens,
                                                  padded_tokens],
                                                 dtype=torch.float64))
        global_tokens = max(1.0, float(counts[0]))
        # DDP averages gradients over processes: scale the per-process sums back to a global mean
        normalizer = torch.tensor(global_tokens / ctx.world_size, device=ctx.device)
        loss_sum = torch.zeros((), dtype=torch.float64)
        load = None
        real = len(batches)
        aux_scale = 1.0 / max(1, real)  # the aux loss is a per-batch mean: average it over micro-batches
        # FSDP2: as many micro-batches as the process with the most (each forward gathers weights from all);
        # DDP: at least one (each step's forward syncs buffers and its backward all-reduces the gradients).
        # Stand-ins make up the rest: their loss counts 0, their tokens not for the experts' balance.
        count = ctx.all_reduce_max(real) if self.sharded else max(real, 1) if ctx.distributed else real
        if count > real:
            filler = batches[-1] if batches else text_stand_in_batch(self.model.tokenizer)
            batches = batches + [filler] * (count - real)
        zero_load = None
        for i, batch in enumerate(batches):
            stand_in = i >= real
            batch = batch.to(ctx.device)
            sync = nullcontext() if (i == count - 1 or not hasattr(wrapped, "no_sync")) else wrapped.no_sync()
            with sync, self.autocast():
                loss, token_loss, batch_load = wrapped(batch.model_inputs(), normalizer, aux_scale)
                (loss * 0 if stand_in else loss).backward()  # a stand-in's gradients are zeros
            if stand_in:
                self.model.decoder.uncount_last_forward()  # its tokens do not move the experts' balance
                zero_load = torch.zeros_like(batch_load.cpu())
            else:
                loss_sum += token_loss.double().cpu()
                load = batch_load.cpu() if load is None else load + batch_load.cpu()
        if load is None:  # every sample of this process was bad: it still joins the router-load all-reduce
            load = zero_load
        loss_sum = float(ctx.all_reduce_sum(loss_sum))
        # the global gradient norm (gradients are already reduced over processes), clipped where the stage says
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, stage.clip_grad_norm or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        finite = math.isfinite(loss_sum) and math.isfinite(norm)  # the same on every process
        # skipped: one bad batch (a NaN or inf) must not poison the weights and every later step; and a batch
        # with nothing to learn (every sample unreadable) must not move them (weight decay, Adam's momentum)
        skipped = None if counts[0] > 0 and finite else "not finite" if not finite else "nothing to learn"
        if skipped is None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, global_tokens, {"skipped": skipped, "samples": int(counts[1]), "dropped": int(counts[2]),
                                         "input_tokens": int(counts[3]), "padded_tokens": int(counts[4]),
                                         "load": ctx.all_reduce_sum(load) if load is not None else None}

    def skipped_step(self, stage: StageConfig, progress: StageProgress, samples, in_a_row: int,
                     reason: str = "not finite"):
        """Warn about an optimizer step skipped for a non-finite loss or gradients, or for a batch with nothing
        to learn (none of its samples readable); stop the run when `max_skipped_steps` came in a row (the
        weights, and so every checkpoint, stay finite and untouched by empty batches)."""
        step = progress.step + 1
        ids = [getattr(s, "sample_id", None) for s in samples if s is not None][:4]
        where = f"stage {stage.name!r}, step {step}"
        limit = self.config.max_skipped_steps
        if reason == "nothing to learn":
            stop = (f"no sample of the last {in_a_row} batches could be read (each step skipped, the weights "
                    f"untouched); the warnings above name the samples and why: check the stage's data files and "
                    f"their media paths (root:)")
            warn = (f"none of the batch's {len(samples)} samples could be read (or none has an answer to learn); "
                    f"the optimizer step was skipped")
        else:
            stop = (f"the loss or the gradients were not finite for {in_a_row} optimizer steps in a row (each one "
                    f"skipped, the weights untouched); lower the stage's learning rates, keep clip_grad_norm, or "
                    f"check the data (the last batch held {ids}), then --resume from the last checkpoint")
            warn = (f"the loss or the gradients are not finite; the optimizer step was skipped (its batch held "
                    f"{ids}{' ...' if len(samples) > len(ids) else ''})")
        if in_a_row >= limit:
            raise TrainingError(f"{where}: {stop}")
        if self.ctx.is_main:
            warnings.warn(f"{where}: {warn}; {in_a_row} in a row, the run stops at {limit}", TrainingWarning,
                          stacklevel=2)

    # -- logging, evaluation, checkpoints ----------------------------------------------------
    def log_train(self, stage, progress, window):
        if not self.ctx.is_main:
            return
        elapsed = time.perf_counter() - window["time"]
        entry = {"kind": "train", "stage": stage.name, "step": progress.global_step, "stage_step": progress.step,
                 # None where no step of the window trained (each skipped, or every sample bad)
                 "loss": window["loss"] / window["tokens"] if window["tokens"] else None,
                 "tokens_per_s": window["input_tokens"] / elapsed,
                 "padded_tokens": window["padded_tokens"],
                 "seconds": time.perf_counter() - self.started,
                 "samples": window["samples"], "skipped_samples": window["dropped"],
                 "skipped_steps": window["skipped_steps"],
                 "lr": window["lr"]}  # the rates of the window's last step (not the schedule's for the next)
        load = window["load"]
        if load is not None and load.numel():
            share = load / load.sum(-1, keepdim=True).clamp(min=1)  # [layers, (image, text), experts]
            entry["router_load"] = {"image": share[:, 0].tolist(), "text": share[:, 1].tolist()}
        self.log.write(**entry)

    def evaluate(self, stage: StageConfig, progress: StageProgress):
        """Validation loss on a few batches and task accuracy (see `_accuracy`); the main process logs them."""
        spec = stage.eval
        if not spec.data:
            return
        with eager():  # generation's shapes (a token at a time, a KV cache) would only compile more graphs
            self._evaluate(stage, progress)

    def _evaluate(self, stage: StageConfig, progress: StageProgress):
        model = self.model
        was_training = {name: part.training for name, part in model.parts().items()}
        model.eval()
        with self._evaluation_weights():
            val_loss = self._validation_loss(stage)
            accuracy = self._accuracy(stage, progress) if stage.eval.limit != 0 else {}
        for name, part in model.parts().items():
            part.train(was_training[name])
        if self.ctx.is_main:
            self.log.write(kind="eval", stage=stage.name, step=progress.global_step, val_loss=val_loss,
                           accuracy=accuracy)
            # (with or without a progress bar: the results are not progress)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
            print(f"\n[{stage.name} step {progress.step}] val loss {val_loss:.4f} {shown}", flush=True)
        self.ctx.barrier()

    def _accuracy(self, stage: StageConfig, progress: StageProgress) -> dict[str, float]:
        """Task accuracy on the stage's eval data, as `fusion eval` measures it (`_evaluate_model`); {} on the
        other processes, and where most samples are bad (with a warning: the run goes on)."""
        spec = stage.eval
        try:
            results = self._evaluate_model(spec.data, spec.root, limit=spec.limit, batch_size=spec.batch_size,
                                           max_new_tokens=spec.max_new_tokens, progress=False)
        except DatasetError as err:
            if self.ctx.is_main:
                warnings.warn(f"stage {stage.name!r} step {progress.step}: no accuracy measured: {err}",
                              TrainingWarning, stacklevel=2)
            return {}
        return _accuracies(results) if results is not None else {}

    @contextlib.contextmanager
    def _evaluation_weights(self):
        """Under FSDP2, the model's weights as an evaluation holds them (`fdist.gathered_for_inference`): its
        own (the embeddings, the LM head) gathered, and with `distributed.gather_for_eval` every block's, the
        tower's and the adapter's too; sharded again on leaving. Collective. Without FSDP2 it changes nothing.
        One hold per evaluation: a stage's (its validation loss, then its accuracy), the final one."""
        if not (self.sharded and getattr(self.model, "_fsdp_applied", False)):
            yield
            return
        with fdist.gathered_for_inference(self.model, whole=self.config.distributed.get("gather_for_eval", False)):
            yield

    def _evaluate_model(self, data, root, **options) -> dict | None:
        """`fusion.evaluation.evaluate` of the model in training on `data` (options: its keywords); the
        results on the main process, None on the others. Without FSDP2 the main process evaluates alone while
        the others wait. Under FSDP2 the processes evaluate together on their shards (`evaluate(processes=)`):
        each answers its share of every batch, all generating in step, each block gathering its weights when it
        runs (the model's own, the embeddings and the LM head, are held whole for the evaluation). No process
        holds the whole model, but each token generated gathers every block's weights once more (the
        evaluation times of `bench/starting_memory.py`); with `distributed.gather_for_eval` every process holds
        the whole model for the evaluation instead and its forwards gather nothing. The caller holds the
        weights for it (`_evaluation_weights`). Raises `DatasetError` where most samples are bad (on every
        process that evaluates)."""
        sharded = self.sharded and getattr(self.model, "_fsdp_applied", False)
        if not sharded and not self.ctx.is_main:
            return None
        from .evaluation.evaluate import evaluate

        # (eager: generation's shapes would only compile more graphs)
        with eager(), warnings.catch_warnings():
            if not self.ctx.is_main:  # its bad samples are said once, by the main process
                warnings.simplefilter("ignore")
            results = evaluate(self.model, self.config.path(data), root=self.config.path(root),
                               processes=self.ctx if sharded else None, **options)
        return results if self.ctx.is_main else None

    def check(self) -> str:
        """What `run` would do, without training or writing anything: the files and model folders the stages
        name are checked as `run` checks them before its first step, and each stage's plan is described (its
        samples, steps and epochs, what it trains). Returns the description; raises what `run` would raise."""
        config = self.config
        state = self.resume_state
        run = ("continues from " + str(state["folder"]) if state else
               "a new run, over the run there (--overwrite)" if self.overwrite else "a new run")
        lines = [f"output_dir: {self.out.resolve()} ({run})"]
        check_model_section(config)
        world = config.data.get("shapes_world")
        world_dir = config.path(world["out_dir"]) if world else None
        pending = world_dir if world_dir is not None and not (world_dir / "world.json").exists() else None
        if world_dir is not None:
            _, _, differ = self._shapes_world_settings()  # the run's own check of a world already there
            extras = " (its train_extra.jsonl rewritten for the new settings by the run)" if differ else ""
            lines.append(f"data: the shapes world in {world_dir.resolve()} "
                         f"({'generated by the first run' if pending else 'generated already'}){extras}")
        progress = self._starting_progress()
        self._check_files(progress.stage_index, not_yet_written=pending)
        if state is not None:  # as the run says it: what the changes to the run's config do
            self._warn_about_config_changes(progress.stage_index)
        # a model built from scratch may train its tokenizer on files of the world still to be generated
        if state is not None or pending is None or config.model.get("init_from"):
            self.model = self._starting_model(trunk_weights=False)  # a trunk's weights are read by the run only
            self._check_resumable(progress)
        if self.model is None:
            lines.append("model: built from scratch once the shapes world exists")
        else:
            size = sum(p.numel() for p in self.model.parameters()) / 1e6
            trunk = config.model.get("trunk")
            built = (f"built on the Llama 4 trunk {config.path(trunk)} (its decoder and tokenizer; its weights are "
                     f"read by the run, not by --check)" if trunk else "built from scratch")
            lines.append(f"model: {config.model.get('init_from') or built} ({size:.1f} M parameters)")
        for stage in config.stages[progress.stage_index:]:
            trains = [name for name in PARTS if stage.rate(name) > 0]
            frozen = [name for name in PARTS if stage.rate(name) <= 0]
            notes = [f"trains {', '.join(trains)}" + (f" ({', '.join(frozen)} frozen)" if frozen else "")]
            if state is not None and stage is config.stages[progress.stage_index] and progress.step > 0:
                notes.insert(0, f"resumes after its step {progress.step}")
            notes += [f"starts from {stage.init_from}"] if stage.init_from else []
            notes += ["compiled"] if stage.compile else []
            notes += [f"evaluates on {stage.eval.data}"] if stage.eval.data else []
            unread = self.model is None or any(pending is not None and config.path(s.path).is_relative_to(pending)
                                               for s in stage.data)
            if unread:
                length = f"{stage.steps} steps" if stage.steps else f"{stage.epochs} epochs"
                plan = f"{length} of {stage.batch_size} samples"
            else:
                self._check_eval_data(stage)
                self._check_training_data(stage)
                samples = len(load_stage_data(config, stage, self.model))  # (the processor does not change counts)
                _check_enough_samples(stage, samples)
                steps = stage.total_steps(samples)
                # (an epoch: the full batches of one pass, see StageConfig.total_steps)
                plan = (f"{steps} steps of {stage.batch_size} samples = "
                        f"{steps / max(samples // stage.batch_size, 1):.2f} epochs of its {samples}")
            lines.append(f"stage {stage.name!r}: {plan}; " + "; ".join(notes))
        if state is not None and progress.stage_index >= len(config.stages):
            lines.append(f"stages: every stage had finished at the checkpoint (run step {progress.global_step}): "
                         f"nothing is trained; the final model is written and evaluated again (to train longer, "
                         f"add a stage: it starts from the model the run has)")
        if config.final_eval:
            final = config.path(config.final_eval.get("data"))
            if self.model is not None and not (pending is not None and final.is_relative_to(pending)):
                self._check_eval_data(None)
            lines.append(f"final_eval: {config.final_eval.get('data')}")
        return "\n".join(lines)

    def _starting_progress(self) -> StageProgress:
        """Where the run starts: the resumed checkpoint's position, else the beginning. A checkpoint inside (or
        after) a stage that the config no longer has cannot go on."""
        if self.resume_state is None:
            return StageProgress()
        progress = StageProgress(**self.resume_state["progress"])
        stages = len(self.config.stages)
        if _stage_of(progress) >= stages:
            name = self.resume_state.get("stage") or _saved_stage_name(self.out, _stage_of(progress))
            where = (f"at the end of stage {progress.stage_index} ({name!r})" if progress.step == 0 else
                     f"in stage {progress.stage_index + 1} ({name!r}) at its step {progress.step}")
            raise ConfigError(f"--resume: the checkpoint {self.resume_state['folder']} is {where} (run step "
                              f"{progress.global_step}), but the config lists only {stages} stage"
                              f"{'s' if stages != 1 else ''}; put that stage back into the config to continue the "
                              f"run, or start it again with --overwrite (overwrite=True)")
        return progress

    def _starting_model(self, trunk_weights: bool = True) -> FusionModel:
        """The model the run starts with, on the run's device: the resumed checkpoint's, else the config's (built
        or loaded; `trunk_weights=False`, for --check: a trunk's decoder on the meta device, see `build_model`).
        Under FSDP2 a saved model is sharded before its weights are read, and so is a `model.trunk`'s decoder,
        each process keeping its shard only (`_shard_then_read`)."""
        if self.resume_state is not None:
            return self._model_from_folder(self.resume_state["folder"] / "model")
        spec = self.config.model
        if trunk_weights and spec.get("init_from"):
            return self._model_from_folder(model_folder(spec["init_from"], self.config.base_dir))
        sharded_trunk = trunk_weights and spec.get("trunk") is not None and self.sharded
        try:
            model = build_model(self.config, trunk_weights=trunk_weights and not sharded_trunk)
        except (ConfigError, CheckpointError, WeightsError):
            raise
        except (ValueError, TypeError) as err:  # a decoder / vision / video setting the model cannot take
            raise ConfigError(f"model: {err}") from err
        if sharded_trunk:
            def read_trunk(model):
                with open_hf_decoder_weights(self.config.path(spec["trunk"])) as weights:
                    weights.copy_into(model.decoder)

            return self._shard_then_read(model, read_trunk)
        return model if not trunk_weights else model.to(self.ctx.device)

    def _model_from_folder(self, folder: Path) -> FusionModel:
        """The model saved in `folder`, on the run's device; under FSDP2 sharded, each process reading its part
        of each weight only."""
        if not self.sharded:
            return FusionModel.from_pretrained(folder).to(self.ctx.device)
        return self._shard_then_read(load_model_folder(folder, read_weights=False),
                                     lambda model: read_model_weights(folder, model))

    def _shard_then_read(self, model: FusionModel, read) -> FusionModel:
        """`model`, some of its parts still on the meta device (a saved model's every part, a trunk's decoder),
        sharded by FSDP2, those parts then allocated and their tensors copied in by `read(model)` one at a time,
        each process keeping its shard: a process never holds the whole of a part it reads (the parts built
        from the config, a trunk's tower and adapter, are built whole in each process, then sharded)."""
        unallocated = [name for name, part in model.parts().items() if next(part.parameters()).is_meta]
        for name, part in model.parts().items():
            if name not in unallocated:
                part.to(self.ctx.device)
        self._shard(model)
        model.allocate(self.ctx.device, unallocated)  # (a saved model's experts' bias is then read with its weights)
        read(model)
        return model

    def _shard(self, model: FusionModel) -> None:
        """FSDP2: each decoder layer, the tower, the adapter and then the whole model sharded over the processes."""
        fdist.apply_fsdp2(model, list(model.decoder.layers) + [model.vision, model.adapter], self.ctx)
        model._fsdp_applied = True

    def _check_files(self, first_stage: int, not_yet_written: Path | None = None):
        """Fail before training, not hours into it, when a data file or a model folder that a stage still to
        run (or the final evaluation) names is missing (files under `not_yet_written` are not looked for)."""
        config = self.config

        def missing_later(path: Path) -> bool:  # a path in the shapes world the run writes before training
            return not_yet_written is not None and path.is_relative_to(not_yet_written)

        def missing(path: Path | None) -> bool:
            return path is not None and not path.is_file() and not missing_later(path)

        def check_root(root: Path | None, where: str) -> None:
            if root is not None and not root.is_dir() and not missing_later(root):
                raise ConfigError(f"{where}: media root {str(root)!r} is not a folder (relative paths are read "
                                  f"from the config file's folder, {str(config.base_dir)!r})")

        for stage in config.stages[first_stage:]:
            where = f"stage {stage.name!r}"
            if stage.batch_size % self.ctx.world_size:
                raise ConfigError(f"{where}: batch_size {stage.batch_size} is not divisible by the "
                                  f"{self.ctx.world_size} processes (each takes an equal share of every batch)")
            for path in [config.path(s.path) for s in stage.data] + [config.path(stage.eval.data)]:
                if missing(path):
                    raise ConfigError(f"{where}: data file {str(path)!r} does not exist (relative paths are read "
                                      f"from the config file's folder, {str(config.base_dir)!r})")
            records = [_records_in(config.path(s.path)) for s in stage.data if not missing(config.path(s.path))]
            if None not in records and len(records) == len(stage.data):  # a bound: grouping, filters only lower it
                _check_enough_samples(stage, sum(n * s.repeat for n, s in zip(records, stage.data)))
            for root in [config.path(s.root) for s in stage.data] + [config.path(stage.eval.root)]:
                check_root(root, where)
            # (a folder inside this run's output_dir, such as an earlier stage's model, is written by the run)
            folder = model_folder(stage.init_from, config.base_dir) if stage.init_from else None
            if folder is not None and not folder.resolve().is_relative_to(self.out.resolve()):
                try:
                    read_model_config(folder)
                except CheckpointError as err:
                    raise ConfigError(f"{where}: init_from: {err}") from err
        final = config.path((config.final_eval or {}).get("data"))
        if missing(final):
            raise ConfigError(f"final_eval: data file {str(final)!r} does not exist")
        check_root(config.path((config.final_eval or {}).get("root")), "final_eval")

    def _check_eval_data(self, stage: StageConfig | None, probe: int = 4):
        """Fail before training, not after it, when a stage's evaluation data (`stage` None: the final
        evaluation's) cannot be read."""
        spec = (self.config.final_eval or {}) if stage is None else vars(stage.eval)
        if not spec.get("data"):
            return
        where = "final_eval" if stage is None else f"stage {stage.name!r}"
        path, root = self.config.path(spec["data"]), self.config.path(spec.get("root"))
        if not path.is_file():
            raise ConfigError(f"{where}: eval data {str(path)!r} does not exist")
        if stage is None:  # as `fusion eval` reads it
            dataset = ConversationDataset(path, self.model.processor, root=root)
        else:
            dataset = load_stage_data(self.config, stage, self.model, files=[stage.eval_source()])
        _check_first_samples(dataset, f"{where}: none of", f"samples of its eval data {str(path)!r}", root, probe,
                             spread=False)

    def _check_training_data(self, stage: StageConfig, dataset=None, probe: int = 4):
        """Fail before the stage trains when the first samples of one of its data files cannot be read (media
        paths relative to the wrong folder, a misspelt key): it would skip step after step, then stop. `dataset`:
        the stage's own (its files read once), else each file is read here (`--check`)."""
        loaded = [dataset] if dataset is not None else [load_stage_data(self.config, stage, self.model, files=[source])
                                                        for source in stage.data]
        # each file's dataset once (a file repeated is one dataset listed again)
        parts = {id(part): part for d in loaded for part in getattr(d, "datasets", [d])}.values()
        for part in parts:
            if len(part):  # (a file with no records the entry keeps is found by the sample count)
                _check_first_samples(part, f"stage {stage.name!r}: none of", f"samples of its data "
                                     f"{part.path!r}", part.root, probe)

    @torch.no_grad()
    def _validation_loss(self, stage: StageConfig) -> float | None:
        spec = stage.eval
        dataset = load_stage_data(self.config, stage, self.model, files=[stage.eval_source()])
        per_process = max(1, stage.batch_size // self.ctx.world_size)
        total = torch.zeros(2, dtype=torch.float64)
        for b in range(spec.loss_batches):
            start = (b * self.ctx.world_size + self.ctx.rank) * per_process
            samples = [dataset[i] for i in range(start, min(start + per_process, len(dataset)))]
            batch = collate_samples(samples, self.model.tokenizer.pad_id, False, 0)
            if batch is None and not self.sharded:
                continue
            # FSDP2: a process past the end of the data still runs a forward like the others, not counted
            stand_in = batch is None
            batch = (text_stand_in_batch(self.model.tokenizer) if stand_in else batch).to(self.ctx.device)
            with self.autocast():
                _, loss_sum, count = supervised_loss_sum(self.model, {**batch.model_inputs(), "labels": None},
                                                         batch.labels)
            if not stand_in:
                total += torch.tensor([float(loss_sum), float(count)], dtype=torch.float64)
        total = self.ctx.all_reduce_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _model_state(self):
        """What the main process writes as the model: under FSDP2 a `StreamedState` (each tensor gathered when
        the file reaches it, so no process holds the whole model; every process must iterate it, see
        `_write_model`), else the whole state dict."""
        return fdist.streamed_model_state(self.model) if self.sharded else fdist.full_model_state(self.model)

    def _write_model(self, state, folder: Path) -> None:
        """The main process writes the model folder from `state`; the others take part in the gathers of a
        streamed one (also where the main process's write failed part way, so that no process waits forever)."""
        try:
            if self.ctx.is_main:
                save_model_folder(self.model, folder, state=state)
        finally:
            if isinstance(state, StreamedState):
                state.drain()

    def save_model(self, folder: Path):
        problem = None
        try:
            self._write_model(self._model_state(), folder)
        except OSError as err:  # atomic: an earlier model in that folder stays as it was
            problem = err
        if self.ctx.all_reduce_max(int(problem is not None)):  # every process stops, not only the one that failed
            raise CheckpointError(f"could not write the model to {folder} ({problem or 'see the main process'}); "
                                  f"{_intact_checkpoint(self.out / 'checkpoints')}") from problem

    def save_checkpoint(self, optimizer, scheduler, progress: StageProgress, data_position: tuple[int, int],
                        stage_samples: int | None = None):
        """A resumable checkpoint: folder `checkpoints/step-{global_step}` then `latest.json` (both atomic). The
        main process writes the model whole (a model folder any process can load; under FSDP2 gathered one
        tensor at a time); the optimizer's state is written by every process, each its own part
        (`fdist.save_optimizer_state`)."""
        model_state = self._model_state()
        root = self.out / "checkpoints"
        name = f"step-{progress.global_step:07d}"
        problem = None
        try:
            with ExitStack() as written:  # (an error inside removes the temporary folder: nothing half-written stays)
                tmp = None
                if self.ctx.is_main:
                    try:
                        tmp = written.enter_context(atomic_folder(root / name))
                    except OSError as err:
                        problem = err
                tmp = self.ctx.broadcast_object(tmp)  # the folder that every process writes its part into
                if tmp is None:
                    raise problem or OSError("the main process could not make the checkpoint's folder")
                if optimizer is not None:
                    fdist.save_optimizer_state(self.model, optimizer, tmp / OPTIMIZER_STATE)
                self._write_model(model_state, tmp / "model")
                if self.ctx.is_main:
                    write_torch_file({"progress": vars(progress),
                                      # the parts whose state is in OPTIMIZER_STATE (None: no optimizer state)
                                      "optimizer_parts": None if optimizer is None
                                      else _parts_of(optimizer.param_groups),
                                      "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                      "data_position": data_position,  # (epoch, batch) of the stage's next batch
                                      "stage_samples": stage_samples,  # how many samples that position counts in
                                      "wall_seconds": self.total_wall_seconds(),
                                      "stage": self.config.stages[_stage_of(progress)].name,  # (for errors)
                                      "rng": _rng_state()}, tmp / TRAINER_STATE)
            if self.ctx.is_main:
                write_json(root / "latest.json", {"folder": name, "step": progress.global_step})
        except OSError as err:  # a full disk, a quota, a folder made read-only
            problem = err
        if self.ctx.all_reduce_max(int(problem is not None)):  # every process stops, not only the one that failed
            raise CheckpointError(f"could not write the checkpoint of step {progress.global_step} to {root / name} "
                                  f"({problem or 'another process failed to write its part'}); "
                                  f"{_intact_checkpoint(root)}") from problem
        if self.ctx.is_main:
            old = sorted(p for p in root.glob("step-*") if p.name != name)
            for folder in old[:max(0, len(old) - self.config.keep_checkpoints + 1)]:
                shutil.rmtree(folder, ignore_errors=True)
        self.ctx.barrier()

    def final_eval(self, folder: Path):
        """The final model's evaluation, written to eval.json. Without FSDP2 the main process reads the final
        model folder `folder` and evaluates it alone; under FSDP2 every process evaluates the model in
        training, which holds the same weights, on its shards (`_evaluate_model`), so no process reads it whole."""
        spec = self.config.final_eval
        if not spec or not (self.ctx.is_main or self.sharded):
            return
        options = {"limit": spec.get("limit"), "batch_size": spec.get("batch_size", 32),
                   "progress": self.progress and self.ctx.is_main}
        try:
            if self.sharded:
                with self._evaluation_weights():
                    results = self._evaluate_model(spec["data"], spec.get("root"), **options)
            else:
                from .evaluation.evaluate import evaluate

                model = FusionModel.from_pretrained(folder, device=self.ctx.device)
                results = evaluate(model, self.config.path(spec["data"]), root=self.config.path(spec.get("root")),
                                   **options)
        except DatasetError as err:  # the model is saved: say why there is no eval.json, do not fail the run
            if self.ctx.is_main:
                warnings.warn(f"final_eval: no evaluation written: {err} (evaluate the final model again with "
                              f"`fusion eval {folder} DATA`)", TrainingWarning, stacklevel=2)
            return
        if not self.ctx.is_main:
            return
        write_json(self.out / "eval.json", results)
        print("final evaluation:", {k: round(v, 4) for k, v in _accuracies(results).items()}, flush=True)


def _check_first_samples(dataset, before: str, after: str, root: Path | None, probe: int, spread: bool = True):
    """ConfigError "`before` N `after` (which) can be read" when none of `dataset`'s first `probe` samples can,
    nor (`spread`) any of `probe` more spread through the rest of it: media paths relative to the wrong folder
    stop here, a training file whose first few samples happen to be bad trains (its bad samples skipped and
    counted). Evaluation data is read from its start (its accuracy takes the first `limit` samples, its
    validation loss the first batches), so it is checked there only (`spread` False)."""
    first = list(range(min(probe, len(dataset))))
    rest = range(len(first), len(dataset))
    more = sorted({rest[(2 * k + 1) * len(rest) // (2 * probe)] for k in range(probe)}) if spread and rest else []
    tried = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for i in first + more:
                tried += 1
                if dataset[i] is not None:
                    return
        except DatasetError:  # the dataset's own "mostly bad" stop (grouped questions count one by one)
            pass
    if not tried:
        return
    which = f"the first {min(tried, len(first))}" + (
        f" and {tried - len(first)} more spread through the file" if tried > len(first) else "")
    parts = getattr(dataset, "datasets", [dataset])
    bad = sum((Counter(getattr(part, "bad_counts", {})) for part in parts), Counter())
    relative_to = f"root {str(root)!r}" if root is not None else "the file's folder"
    raise ConfigError(f"{before} {tried} {after} ({which}) can be read ({dict(bad)}); check the file and the "
                      f"paths in it (they are relative to {relative_to})")


def _check_enough_samples(stage: StageConfig, samples: int):
    """A stage needs at least one full batch of samples (an epoch's last partial batch is dropped)."""
    if samples < stage.batch_size:
        raise DatasetError(f"stage {stage.name!r}: its data has {samples} samples, fewer than one batch of "
                           f"{stage.batch_size}; give it more data or a smaller batch_size (if a run stops here, "
                           f"--resume continues it from its last checkpoint once this is fixed)")


def _records_in(path: Path | None) -> int | None:
    """How many records a dataset file holds, without reading them as samples (at least its sample count):
    the non-blank lines of a JSONL file, the entries of a JSON list; None where that cannot be told."""
    if path is None or not path.is_file():
        return None
    try:
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if path.suffix == ".json" and path.stat().st_size < 64 << 20:  # (a larger one is counted by --check)
            records = json.loads(path.read_bytes())
            return len(records) if isinstance(records, list) else None
    except (OSError, ValueError):  # the stage's own reading says what is wrong with it
        return None
    return None


def _intact_checkpoint(root: Path) -> str:
    """What a run whose checkpoint could not be written can resume from (the text of an error)."""
    try:
        latest = json.loads((root / "latest.json").read_text())
    except (OSError, ValueError):
        return "the run has no earlier checkpoint; free space (or fix the folder) and start it again"
    return (f"the checkpoint of step {latest['step']} ({root / latest['folder']}) is intact: free space "
            f"(or fix the folder) and continue with --resume")


def config_changes(old, new, where: str = "") -> list[str]:
    """Each difference between two JSON-like configs as "path: old -> new" (e.g. "stages[2].steps: 1000 -> 800")."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in dict.fromkeys([*old, *new])
                for c in config_changes(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in config_changes(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {json.dumps(old)} -> {json.dumps(new)}"]


class TrainingWarning(UserWarning):
    """Something in a run that it survives but the user should know (e.g. a skipped optimizer step)."""


def new_window() -> dict:
    """Running sums between two log lines."""
    return {"loss": 0.0, "tokens": 0, "input_tokens": 0, "padded_tokens": 0, "samples": 0, "dropped": 0,
            "skipped_steps": 0, "time": time.perf_counter(), "load": None}


def _uncollated(samples):
    """The loader's collate_fn: a batch stays its list of samples (split into micro-batches and collated later)."""
    return samples


def _accuracies(results: dict) -> dict:
    """Flatten `evaluate` results to {metric name: value} for logging."""
    flat = {}
    for task, r in results.get("tasks", results).items():
        if not isinstance(r, dict):
            continue
        for key in ("accuracy", "bleu4", "cider"):
            if isinstance(r.get(key), (int, float)):
                flat[f"{task}/{key}"] = r[key]
        for qtype, value in (r.get("by_type") or {}).items():
            if isinstance(value, (int, float)):
                flat[f"{task}/{qtype}"] = value
    return flat


def _stage_of(progress: StageProgress) -> int:
    """The index of the stage a checkpoint is in, or (at step 0, where one is written after each stage) has ended."""
    return progress.stage_index - 1 if progress.step == 0 else progress.stage_index


def _saved_stage_name(out: Path, index: int) -> str | None:
    """The name of stage `index` in the config the run was last started with (None where it cannot be told)."""
    try:
        return json.loads((out / "train_config.json").read_text())["stages"][index]["name"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _parts_of(param_groups) -> list[str]:
    """The parts (vision, adapter, decoder) that an optimizer's param groups train, sorted."""
    return sorted({str(group.get("part")) for group in param_groups})


def _saved_parts(state: dict | None) -> list[str] | None:
    """The parts whose optimizer state a checkpoint's trainer state holds; None where it holds none (a stage's
    end)."""
    if state is None:
        return None
    if state.get("optimizer") is not None:  # (fusion before 2026-12-03: the whole optimizer state inside)
        return _parts_of(state["optimizer"]["param_groups"])
    return state.get("optimizer_parts")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the checkpoint's machine: those this machine has (another may see more or fewer)
        for device, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def train(config: TrainConfig | str | os.PathLike, resume: bool = False, progress: bool = True,
          overwrite: bool = False) -> Path:
    """Run a training config (a `TrainConfig` or a YAML path); returns the final model folder.

    `resume`: continue the run in the config's output_dir from its latest checkpoint. A new run (neither
    `resume` nor `overwrite`) refuses an output_dir that already holds a run, so that a forgotten
    `--resume` never replaces a run's checkpoints and log; `overwrite` deletes that run's files first.
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config, resume=resume, progress=progress, overwrite=overwrite).run()


def check(config: TrainConfig | str | os.PathLike, resume: bool = False, overwrite: bool = False) -> str:
    """What `train(config, resume, overwrite)` would do, checked and described without training or writing
    anything (`fusion train CONFIG --check`): it raises the errors that the run would raise before its first
    step (a config mistake, a missing data file or model folder, unreadable evaluation data) and returns
    each stage's plan (samples, steps, epochs, the parts it trains)."""
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config, resume=resume, progress=False, overwrite=overwrite).check()


#: what a run writes into its output_dir (an overwritten run's files are these, and only these, deleted)
RUN_FILES = ("checkpoints", "stages", "final", "metrics.jsonl", "metrics.png", "train_config.json",
             "run_summary.json", "eval.json")


def run_in(folder: Path) -> str | None:
    """What shows that `folder` holds a training run (e.g. "a checkpoint at step 400"), or None."""
    pointer = folder / "checkpoints" / "latest.json"
    if pointer.is_file():
        try:
            return f"a checkpoint ({json.loads(pointer.read_text())['folder']})"
        except (ValueError, KeyError):
            return "checkpoints"
    if (folder / "final").exists():
        return "a final model"
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a metrics log"
    return None
