"""Staged training: freezing, both dataset formats, bad samples, exact resume after SIGKILL, torchrun."""
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fusion
from fusion.data.datasets import DatasetWarning
from fusion.errors import ConfigError
from fusion.data.shapes_world import ShapesWorldConfig, generate_shapes_world
from fusion.distributed import DistContext
from fusion.run_log import read_metrics
from fusion.cli import main as fusion_cli_main
from fusion.data.stage_data import StageBatches, load_stage_data
from fusion.stage_setup import build_model, build_tokenizer, lr_multiplier
from fusion.trainer import train
from fusion.training_step import TrainingStep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_shapes_world(out, ShapesWorldConfig(image_size=32, train_images=24, val_images=6, test_images=6,
                                                 train_videos=4, val_videos=2, test_videos=2, video_size=32,
                                                 video_frames=6, text_samples=200, questions_per_image=3, seed=1))
    return out


def base_config(world, out, stages, **extra):
    config = {
        "name": "tiny", "output_dir": str(out), "seed": 0, "log_every": 1, "checkpoint_every": 0,
        "model": {
            "tokenizer": {"train_on": [str(world / "text.jsonl"), str(world / "train.jsonl")], "vocab_size": 300},
            "decoder": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
                        "intermediate_size": 32, "num_experts": 4, "attention_chunk_size": 64, "floor_scale": 64},
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
            "video": {"num_frames": 2},
        },
        "stages": stages,
    }
    config.update(extra)
    return config


def write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


def losses(out):
    return [(e["step"], e["loss"]) for e in read_metrics(Path(out) / "metrics.jsonl") if e["kind"] == "train"]


def test_a_trained_tokenizer_spends_one_token_on_each_chat_header_word(world, tmp_path):
    """The tokenizer is trained on the words the chat template adds too: a turn's header (<|header_start|>,
    the role, <|header_end|>, a blank line) costs four tokens in every sample (an assistant header took 11
    when BPE had only seen message texts)."""
    from types import SimpleNamespace


    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                      {"from": "gpt", "value": "red"}]}] * 50))
    for files in ([str(world / "train.jsonl")], [str(llava)]):
        tok = build_tokenizer({"train_on": files, "vocab_size": 300}, SimpleNamespace(path=Path))
        assert [len(tok.encode(text)) for text in ("assistant", "user", "\n\n")] == [1, 1, 1], files
    conversation = [{"role": "user", "content": "What color is it?"}, {"role": "assistant", "content": "red"}]
    ids = tok.encode_conversation(conversation).input_ids
    assert len(ids) == 1 + 4 + len(tok.encode("What color is it?")) + 1 + 4 + len(tok.encode("red")) + 1


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_multiplier(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)


def test_global_batches_are_the_same_for_one_or_two_processes():
    one = StageBatches(50, 8, DistContext(0, 1), seed=3, stage_index=1)
    two = [StageBatches(50, 8, DistContext(r, 2), seed=3, stage_index=1) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(13):  # crosses an epoch boundary (6 batches per epoch)
        assert next(it1) == next(it2[0]) + next(it2[1])


def test_a_batch_size_the_processes_cannot_share_fails_before_any_stage_trains(world, tmp_path):
    """Under torchrun each process takes an equal share of every batch: a later stage's batch_size that the
    processes cannot share is named before the first stage trains, not once it is reached."""
    from fusion.errors import ConfigError
    from fusion.trainer import Trainer

    first = {"name": "first", "data": str(world / "text.jsonl"), "steps": 1, "batch_size": 4, "lr": {"decoder": 1e-3}}
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [
        first, {**first, "name": "second", "batch_size": 3}]))
    trainer = Trainer(config, progress=False)
    trainer.ctx = DistContext(rank=0, world_size=2)  # as two processes see it (no process group needed here)
    with pytest.raises(ConfigError, match=r"stage 'second': batch_size 3 is not divisible by the 2 processes"):
        trainer.check()


def test_every_process_stops_with_the_signal_one_of_them_got():
    """SIGTERM reaching one process of a run: all stop at the same step, and each exits with that signal's
    code (143), not a bare 128 on the ones the signal did not reach."""
    from fusion.stop_signals import StopSignals

    class OtherProcessGotSigterm(DistContext):
        def all_reduce_max(self, value):
            return max(value, int(signal.SIGTERM))

    stop = StopSignals()
    assert stop.agreed(OtherProcessGotSigterm(rank=1, world_size=2)) and stop.signum == signal.SIGTERM
    assert not StopSignals().agreed(DistContext())


def test_a_generated_world_with_other_settings_is_refused_not_reused(world, tmp_path):
    """`data.shapes_world` generates the world once; a folder written with other settings is not silently
    trained on (a changed recipe would otherwise keep its old data)."""
    from fusion.errors import ConfigError
    from fusion.train_config import load_train_config
    from fusion.trainer import Trainer

    settings = json.loads((world / "world.json").read_text())["config"]
    stages = [{"name": "trunk", "data": str(world / "text.jsonl"), "steps": 1, "lr": {"decoder": 1e-3}}]

    def trainer(**spec):
        config = base_config(world, tmp_path / "run", stages, data={"shapes_world": {"out_dir": str(world), **spec}})
        return Trainer(load_train_config(write_config(tmp_path / "run.yaml", config)), progress=False)

    trainer(**settings).prepare_data()  # the same settings: reused as it is
    with pytest.raises(ConfigError, match=r"other settings.*'train_jitter': \(0.0, 0.5\).*delete that folder"):
        trainer(**{**settings, "train_jitter": 0.5}).prepare_data()
    with pytest.raises(ConfigError, match=r"other settings.*'train_jitter'"):  # --check says what the run would
        trainer(**{**settings, "train_jitter": 0.5}).check()


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_uses_bf16_only_where_the_cpu_computes_it_natively(world, tmp_path, monkeypatch, native):
    """On a CPU without AVX512-BF16/AMX torch emulates bf16 (tens of times slower than float32): `auto` trains
    in float32 there, an explicit `bf16` is obeyed with a warning that says what to use instead."""
    from fusion.train_config import load_train_config
    from fusion.trainer import Trainer

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    stages = [{"name": "trunk", "data": str(world / "text.jsonl"), "steps": 1, "lr": {"decoder": 1e-3}}]

    def autocast_dtype(precision):
        config = base_config(world, tmp_path / "run", stages, precision=precision, device="cpu")
        return Trainer(load_train_config(write_config(tmp_path / "run.yaml", config)), progress=False).autocast_dtype

    assert autocast_dtype("auto") == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32") is None
    config = base_config(world, tmp_path / "run", stages, precision="auto", device="cpu")
    trainer = Trainer(load_train_config(write_config(tmp_path / "run.yaml", config)), progress=False)
    assert trainer.computed_in == ("bf16 autocast" if native else "float32")  # printed, and in run_summary.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autocast_dtype("bf16") == torch.bfloat16
    slow = [w for w in caught if "no native bf16" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if not native:
        assert "precision: auto" in str(slow[0].message)


def test_changing_only_the_extra_questions_rewrites_their_file_and_keeps_the_media(world, tmp_path):
    from fusion.train_config import load_train_config
    from fusion.trainer import Trainer

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    settings = json.loads((copy / "world.json").read_text())["config"]
    media = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.suffix in (".png", ".mp4")}
    stages = [{"name": "trunk", "data": str(copy / "text.jsonl"), "steps": 1, "lr": {"decoder": 1e-3}}]
    for extra, balanced in (({"relation": 3}, False), ({"relation": 3}, True),
                            ({"position": 1, "relation": 3}, ["relation"]), ({}, False)):
        spec = {"out_dir": str(copy), **settings, "train_extra_questions": extra, "train_extra_balanced": balanced}
        config = base_config(world, tmp_path / "run", stages, data={"shapes_world": spec})
        Trainer(load_train_config(write_config(tmp_path / "run.yaml", config)), progress=False).prepare_data()
        saved = json.loads((copy / "world.json").read_text())["config"]
        assert (saved["train_extra_questions"], saved["train_extra_balanced"]) == (extra, balanced)
        assert (copy / "train_extra.jsonl").exists() == bool(extra)
    assert {p: p.stat().st_mtime_ns for p in media} == media  # no image or video was drawn again


def test_a_stage_asks_each_image_the_questions_of_all_its_files_at_once(world, tmp_path):
    """With join_files, a stage listing train.jsonl and train_extra.jsonl trains one sample per image
    (encoded once) holding its questions from both files: the extra questions take no media slot."""
    from fusion.data.shapes_world import rewrite_train_extra
    from fusion.train_config import load_train_config

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    settings = json.loads((copy / "world.json").read_text())["config"]
    rewrite_train_extra(copy, ShapesWorldConfig(**{**settings, "train_extra_questions": {"relation": 4}}))
    files = [str(copy / "train.jsonl"), str(copy / "train_extra.jsonl")]
    stages = [{"name": "s", "data": files, "steps": 1, "group_by_media": True, "join_files": True,
               "lr": {"decoder": 1e-3}}]
    config = load_train_config(write_config(tmp_path / "run.yaml", base_config(world, tmp_path / "run", stages)))
    data = load_stage_data(config, config.stages[0], build_model(config))
    train_rows = [json.loads(line) for line in open(files[0])]
    extra_rows = [json.loads(line) for line in open(files[1])]
    media = {tuple(r["images"] + r["videos"]) for r in train_rows}
    assert len(data) == len(media)  # one sample per image or video of train.jsonl
    members = [m for r in data.records for m in (r.members or (r.id,))]
    assert sorted(members) == sorted(r["id"] for r in train_rows + extra_rows)  # no question lost


def test_a_stage_trains_on_chosen_types_and_media_of_its_files_repeated(world, tmp_path):
    """A data entry may keep some question types or media of a file and repeat it: e.g. a last stage that
    leaves out mastered question types and sees each video twice per epoch. The config round-trips through
    the run folder's train_config.json (what --resume reads)."""
    from fusion.errors import ConfigError
    from fusion.train_config import TrainConfig, load_train_config

    train_file = str(world / "train.jsonl")
    stages = [{"name": "s", "steps": 2, "batch_size": 4, "group_by_media": True, "lr": {"decoder": 1e-3},
               "data": [{"path": train_file, "types": ["count", "position"]},
                        {"path": train_file, "media": ["video"], "repeat": 2}]}]
    config = load_train_config(write_config(tmp_path / "run.yaml", base_config(world, tmp_path / "run", stages)))
    data = load_stage_data(config, config.stages[0], build_model(config))
    rows = [json.loads(line) for line in open(train_file)]
    images = [r for r in rows if r["images"] and r["type"] in ("count", "position")]
    videos = [r for r in rows if r["videos"]]
    assert len(data.datasets) == 3 and data.datasets[1] is data.datasets[2]  # the video part, twice
    assert len(data) == len({r["images"][0] for r in images}) + 2 * len({r["videos"][0] for r in videos})
    kept = [m for d in data.datasets[:2] for r in d.records for m in (r.members or (r.id,))]
    assert sorted(kept) == sorted(r["id"] for r in images + videos)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.stages[0].data == config.stages[0].data
    trained = tmp_path / "trained"
    train(write_config(tmp_path / "trained.yaml", base_config(world, trained, stages)))
    assert [s for s, _ in losses(trained)] == [1, 2]
    for bad, message in (({"path": train_file, "repeat": 0}, "repeat of .* must be an integer >= 1"),
                         ({"path": train_file, "media": ["audio"]}, r"unknown media \['audio'\]"),
                         ({"file": train_file}, r"a data entry: unknown key 'file'")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({"stages": [{**stages[0], "data": [bad]}]})


def test_the_aux_balance_loss_trains_the_routers_and_a_stages_coefficient_ends_with_the_stage(world, tmp_path):
    """The auxiliary balance loss (the decoder's `aux_loss_coef`, or a stage's) is added to the training loss:
    the routers end elsewhere than without it. A stage's coefficient applies to that stage only: the next stage
    goes back to the model's (0 here), as if it had been written out."""
    def routers(name, first_aux, second_aux, decoder_aux=None):
        stages = [{"name": "a", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 4,
                   "lr": {"decoder": 1e-2}, **first_aux},
                  {"name": "b", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 4,
                   "lr": {"decoder": 1e-2}, **second_aux}]
        config = base_config(world, tmp_path / name, stages)
        if decoder_aux is not None:
            config["model"]["decoder"]["aux_loss_coef"] = decoder_aux
        train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
        state = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        return torch.cat([v.flatten() for k, v in sorted(state.items()) if k.endswith("router.weight")])

    plain = routers("plain", {}, {})
    balanced = routers("balanced", {"aux_loss_coef": 5.0}, {})
    assert not torch.equal(plain, balanced)
    assert torch.equal(balanced, routers("written_out", {"aux_loss_coef": 5.0}, {"aux_loss_coef": 0.0}))
    assert not torch.equal(plain, routers("model_wide", {}, {}, decoder_aux=5.0))


def test_frozen_parts_stay_bit_identical_and_trainable_parts_move(world, tmp_path, monkeypatch):
    """A part at rate 0 is frozen in the trainer itself: in eval mode, no gradient, and (the vision tower) no
    autograd graph through it, in every step; its weights come out bit-identical."""
    stages = [{"name": "trunk", "data": str(world / "text.jsonl"), "steps": 3, "batch_size": 4,
               "lr": {"decoder": 1e-3}},
              {"name": "cotrain", "data": str(world / "train.jsonl"), "steps": 3, "batch_size": 4,
               "lr": {"vision": 1e-3, "adapter": 1e-3}},
              {"name": "adapter", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 4,
               "lr": {"adapter": 1e-3, "decoder": 1e-3}}]
    seen = []
    forward = fusion.training_step.TrainingStep.forward

    def observed(self, inputs, normalizer, aux_scale):
        model = self.model
        tower = []
        hook = model.vision.register_forward_hook(lambda m, i, out: tower.append(out.requires_grad))
        try:
            result = forward(self, inputs, normalizer, aux_scale)
        finally:
            hook.remove()
        parts = {name: getattr(model, name) for name in ("decoder", "vision", "adapter")}
        seen.append({name: (part.training, any(p.requires_grad or p.grad is not None for p in part.parameters()))
                     for name, part in parts.items()} | {"tower_graph": any(tower)})
        return result

    monkeypatch.setattr(fusion.training_step.TrainingStep, "forward", observed)
    final = train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages)), progress=False)
    trains = [{"decoder"}] * 3 + [{"vision", "adapter"}] * 3 + [{"adapter", "decoder"}] * 2
    assert len(seen) >= len(trains)
    for step, parts in zip(seen, trains):  # (training mode, has or wants a gradient) of each part, per forward
        assert all(step[name] == ((name in parts),) * 2 for name in ("decoder", "vision", "adapter")), step
    assert [step["tower_graph"] for step in seen[3:6]] == [True] * 3 and not any(s["tower_graph"] for s in seen[6:])
    trunk = load_file(tmp_path / "run" / "stages" / "trunk" / "model.safetensors")
    cotrain = load_file(tmp_path / "run" / "stages" / "cotrain" / "model.safetensors")
    for name, tensor in trunk.items():
        moved = not torch.equal(tensor, cotrain[name])
        if name.startswith("decoder."):
            assert not moved, f"{name} changed while the decoder was frozen"
        elif name.startswith(("vision.", "adapter.")) and tensor.dtype.is_floating_point:
            assert moved or "norm" in name or "bias" in name, f"{name} did not train"
    last = load_file(final / "model.safetensors")
    assert all(torch.equal(tensor, last[name]) for name, tensor in cotrain.items() if name.startswith("vision."))


def test_a_new_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_only_its_files(world, tmp_path):
    """A forgotten --resume must not replace a run's checkpoints and log: a new run into a folder that holds
    one stops with a message naming both ways on; --overwrite deletes that run's files (and nothing else of
    the folder's) and starts again."""
    from fusion.errors import ConfigError

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    out = tmp_path / "run"
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, out, stages, checkpoint_every=1))
    train(config, progress=False)
    first = losses(out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "latest.json").unlink()  # a run killed after its first checkpoint still counts:
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # its log
    with pytest.raises(ConfigError, match=r"already holds a run \(a final model\).*--resume.*--overwrite"):
        train(config, progress=False)
    assert len(losses(out)) == 1  # untouched
    (out / "checkpoints" / "stale-step-9").mkdir()
    train(config, progress=False, overwrite=True)
    assert losses(out) == first and (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints" / "stale-step-9").exists()
    with pytest.raises(ConfigError, match="exclude each other"):
        train(config, progress=False, resume=True, overwrite=True)


def test_overwrite_with_a_config_mistake_leaves_the_earlier_run_as_it_was(world, tmp_path):
    """--overwrite deletes the earlier run only once the new config passed its checks: a typo in it (a data
    file, an init_from folder) is refused and the earlier run is still there."""
    from fusion.errors import ConfigError

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    out = tmp_path / "run"
    train(fusion.trainer.TrainConfig.from_dict(base_config(world, out, stages, checkpoint_every=1)), progress=False)
    before = sorted(p.name for p in out.iterdir())
    first = losses(out)
    for mistake in [{"data": str(world / "txet.jsonl")}, {"init_from": str(tmp_path / "no-such-model")}]:
        config = fusion.trainer.TrainConfig.from_dict(base_config(world, out, [{**stages[0], **mistake}]))
        with pytest.raises(ConfigError, match="does not exist|init_from"):
            train(config, progress=False, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == before and losses(out) == first


def test_a_batch_with_no_readable_sample_is_skipped_and_moves_no_weight(world, tmp_path, monkeypatch):
    """A stage whose samples cannot be read (a wrong media root, a missing folder) must not "train": such a
    step is skipped (no weight decay, no Adam update), logged without a loss, and enough of them in a row
    stop the run with a message pointing at the data."""
    from fusion.errors import TrainingError
    from fusion.trainer import TrainingWarning

    # (the first samples of a stage's files are read before it trains, which stops there: here the media vanish
    # once that check has passed, as on a network folder that goes away)
    monkeypatch.setattr(fusion.trainer.Trainer, "_check_training_data", lambda self, stage, dataset=None, probe=4: None)

    no_media = tmp_path / "no_media"
    no_media.mkdir()
    shutil.copy(world / "train.jsonl", no_media / "train.jsonl")  # its images/ and videos/ are not there
    stages = [{"name": "text", "data": str(world / "text.jsonl"), "steps": 1, "batch_size": 4,
               "lr": {"decoder": 1e-3}},
              {"name": "media", "data": str(no_media / "train.jsonl"), "steps": 3, "batch_size": 4,
               "weight_decay": 0.1, "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}]
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        with pytest.warns(TrainingWarning, match=r"stage 'media', step \d: none of the batch's 4 samples could be "
                                                 r"read .*the optimizer step was skipped"):
            final = train(fusion.trainer.TrainConfig.from_dict(base_config(world, out, stages)), progress=False)
    before, after = load_file(out / "stages" / "text" / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # weight decay would have moved them
    media = [e for e in read_metrics(out / "metrics.jsonl") if e.get("stage") == "media" and e["kind"] == "train"]
    assert [(e["loss"], e["skipped_steps"], e["skipped_samples"]) for e in media] == [(None, 1, 4)] * 3

    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "stops", stages, max_skipped_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingError, match=r"stage 'media', step 2: no sample of the last 2 batches could be "
                                                 r"read .*media paths"):
            train(config, progress=False)


def test_a_step_with_a_non_finite_loss_is_skipped_and_the_run_goes_on(world, tmp_path, monkeypatch):
    """One batch whose loss is NaN (an overflow, a broken sample) must not poison the weights: its optimizer
    step is skipped with a warning naming the step and counted in the log, and the run goes on; a loss
    that stays non-finite stops the run with a message instead of training NaNs into every checkpoint."""
    from fusion.errors import TrainingError
    from fusion.trainer import TrainingWarning

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 4, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    clean = train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "clean", stages)),
                  progress=False)
    forward, calls = TrainingStep.forward, []

    def nan_at(steps):
        def poisoned(self, inputs, normalizer, aux_scale):
            calls.append(1)
            loss, token_loss, load = forward(self, inputs, normalizer, aux_scale)
            return (loss * float("nan"), token_loss * float("nan"), load) if len(calls) in steps else (loss, token_loss,
                                                                                                       load)
        return poisoned

    monkeypatch.setattr(TrainingStep, "forward", nan_at({2}))
    with pytest.warns(TrainingWarning, match=r"stage 's', step 2: the loss or the gradients are not finite; the "
                                             r"optimizer step was skipped"):
        final = train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "nan", stages)),
                      progress=False)
    entries = [e for e in read_metrics(tmp_path / "nan" / "metrics.jsonl") if e["kind"] == "train"]
    assert [e["skipped_steps"] for e in entries] == [0, 1, 0, 0]
    assert entries[1]["loss"] is None and all(math.isfinite(e["loss"]) for e in entries if not e["skipped_steps"])
    weights = load_file(final / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.dtype.is_floating_point)
    assert losses(tmp_path / "nan")[0] == losses(tmp_path / "clean")[0]  # the same run up to the bad step
    assert load_file(clean / "model.safetensors").keys() == weights.keys()

    calls.clear()
    monkeypatch.setattr(TrainingStep, "forward", nan_at({2, 3, 4}))
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "stuck", stages, max_skipped_steps=3))
    with pytest.warns(TrainingWarning), pytest.raises(TrainingError, match=r"step 4: .* not finite for 3 optimizer "
                                                                             r"steps in a row"):
        train(config, progress=False)


def test_a_llama4_trunk_from_a_hugging_face_folder_stays_frozen_while_the_tower_trains(world, tmp_path):
    """`model: {trunk: FOLDER}` starts from a Hugging Face Llama 4 checkpoint's decoder (settings and weights) and
    tokenizer (its ids; the video markers on two fillers); a stage that trains the tower and adapter against it
    leaves its weights bit-identical, and the saved model loads with that tokenizer. Settings that the trunk
    replaces, and a folder without its tokenizer, are config errors before anything runs."""
    pytest.importorskip("transformers")
    from fusion.stage_setup import _texts_of
    from tests.tiny_models import tiny_llama4_checkpoint

    ids = tiny_llama4_checkpoint(tmp_path / "llama4", _texts_of([world / "text.jsonl", world / "train.jsonl"]))
    trunk = fusion.Decoder.from_hf(tmp_path / "llama4", dtype=torch.float32).state_dict()
    stage = {"name": "cotrain", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 4,
             "lr": {"vision": 1e-3, "adapter": 1e-3}}
    config = base_config(world, tmp_path / "run", [stage])
    del config["model"]["tokenizer"], config["model"]["decoder"]
    config["model"]["trunk"] = str(tmp_path / "llama4")
    final = train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
    assert [step for step, loss in losses(tmp_path / "run") if math.isfinite(loss)] == [1, 2]
    model = fusion.FusionModel.from_pretrained(final)
    assert model.decoder.state_dict().keys() == trunk.keys()
    assert all(torch.equal(model.decoder.state_dict()[k], v) for k, v in trunk.items())
    assert (model.tokenizer.patch_id, model.tokenizer.video_end_id) == (ids["<|patch|>"], ids["<|reserved_special_token_3|>"])
    assert model.config.decoder.num_experts == 4 and model.config.decoder.nope_interval == 2

    config["output_dir"] = str(tmp_path / "another")
    with pytest.MonkeyPatch.context() as patch:  # --check reads the trunk's config and tokenizer, not its weights
        patch.setattr(fusion.Decoder, "from_hf", lambda *args, **kwargs: pytest.fail("--check read the weights"))
        assert f"model: built on the Llama 4 trunk {tmp_path / 'llama4'} (its decoder and tokenizer; its weights are " \
               f"read by the run, not by --check)" in fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(config))
    for key, value in (("decoder", {"hidden_size": 32}), ("tokenizer", {"path": str(tmp_path / "llama4")})):
        clash = {**config, "model": {**config["model"], key: value}}
        with pytest.raises(ConfigError, match=rf"model: trunk brings the decoder's settings and weights and its "
                                              rf"tokenizer, so \['{key}'\] cannot stand beside it"):
            fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(clash))
    # the tower and adapter are the seed's, whatever ran before
    from fusion.stage_setup import build_model
    built = build_model(fusion.trainer.TrainConfig.from_dict(config))
    torch.manual_seed(123)
    again = build_model(fusion.trainer.TrainConfig.from_dict(config))
    assert all(torch.equal(a, b) for a, b in zip(built.vision.state_dict().values(), again.vision.state_dict().values()))
    with pytest.raises(ConfigError, match="the given decoder's config differs from config.decoder"):
        fusion.FusionModel(built.config, built.tokenizer, decoder=fusion.Decoder(dataclasses.replace(
            built.config.decoder, num_layers=1)))

    data = json.loads((tmp_path / "llama4" / "tokenizer.json").read_text())  # a token past the decoder's table
    data["added_tokens"].append({**data["added_tokens"][-1], "id": built.config.decoder.vocab_size,
                                 "content": "<|one_too_many|>"})
    (tmp_path / "llama4" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"model.trunk: the tokenizer of '.*llama4' has \d+ tokens, more than the "
                                          r"decoder's vocab_size"):
        fusion.trainer.train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
    (tmp_path / "llama4" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"model.trunk: '.*llama4' is not a Hugging Face Llama 4 checkpoint folder "
                                          r"with its tokenizer: tokenizer.json missing"):
        fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(config))


def test_jsonl_and_llava_json_both_train_and_bad_samples_are_counted(world, tmp_path):
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    records = [r for r in records if r["images"]][:8]
    llava = [{"id": r["id"], "image": r["images"][0],
              "conversations": [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
                                for t in r["conversations"]]} for r in records]
    broken = dict(records[0], id="broken-image", images=["images/train/does-not-exist.png"])
    (world / "llava.json").write_text(json.dumps(llava))
    (world / "with_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1:] + [broken]))
    for data, expected_skips in (("llava.json", 0), ("with_bad.jsonl", 2)):
        out = tmp_path / data
        # 8 samples, batches of 4, 4 steps: two epochs, so the broken sample comes up twice
        stages = [{"name": "s", "data": str(world / data), "steps": 4, "batch_size": 4,
                   "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}]
        # the bad sample is named in a warning (each time it comes up), and training goes on
        warned = (pytest.warns(DatasetWarning, match="skipped sample 'broken-image'.*does-not-exist.png")
                  if expected_skips else contextlib.nullcontext())
        with warned:
            train(fusion.trainer.TrainConfig.from_dict(base_config(world, out, stages)), progress=False)
        entries = [e for e in read_metrics(out / "metrics.jsonl") if e["kind"] == "train"]
        assert len(entries) == 4 and all(e["loss"] == e["loss"] for e in entries)  # trained, finite
        assert sum(e["skipped_samples"] for e in entries) == expected_skips
        assert sum(e["samples"] for e in entries) == 16 - expected_skips


def test_a_step_whose_only_sample_is_bad_is_skipped_inside_a_logging_window(world, tmp_path):
    """Batches of one on data with a wrong image path: the bad sample's step is skipped (no router load), the
    steps before and after it in the same logged window train, and the window is logged."""
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    records = [r for r in records if r["images"]][:6]
    broken = dict(records[0], id="broken-image", images=["images/train/does-not-exist.png"])
    (world / "one_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1:] + [broken]))
    stages = [{"name": "s", "data": str(world / "one_bad.jsonl"), "steps": 6, "batch_size": 1,
               "lr": {"adapter": 1e-3, "decoder": 1e-3}}]
    from fusion.trainer import TrainingWarning

    with pytest.warns(DatasetWarning, match="skipped sample 'broken-image'"), \
            pytest.warns(TrainingWarning, match="none of the batch's 1 samples could be read"):
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, log_every=6)),
              progress=False)
    [entry] = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "train"]
    assert entry["skipped_steps"] == 1 and entry["samples"] == 5 and entry["loss"] == entry["loss"]
    assert entry["router_load"]["text"]  # the trained steps' load


def test_training_data_whose_first_samples_cannot_be_read_fails_before_training(world, tmp_path, capsys):
    """Media paths relative to the wrong folder: `--check` and the run say so before any step (as for eval data)."""
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    moved = tmp_path / "elsewhere" / "train.jsonl"  # the file moved away from its images
    moved.parent.mkdir()
    moved.write_text("".join(json.dumps(r) + "\n" for r in records if r["images"]))
    stages = [{"name": "s", "data": str(moved), "steps": 2, "batch_size": 2, "lr": {"adapter": 1e-3}}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages))
    expected = (r"stage 's': none of 8 samples of its data .*elsewhere/train.jsonl' \(the first 4 and 4 more spread "
                r"through the file\) can be read \({'missing image': 8}\).*relative to .*elsewhere")
    with pytest.raises(ConfigError, match=expected):
        fusion.trainer.check(config)
    with pytest.raises(ConfigError, match=expected):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or losses(tmp_path / "run") == []  # no step
    # grouped by image, each sample's questions count one by one towards the dataset's own "mostly bad" stop:
    # the check still says which stage and file (it stopped with the dataset's error, no stage named)
    grouped = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [{**stages[0],
                                                                                          "group_by_media": True}]))
    with pytest.raises(ConfigError, match=r"stage 's': none of \d+ samples of its data .*elsewhere/train.jsonl'"):
        fusion.trainer.check(grouped)
    # with the right root, it trains; the evaluation's results are printed without a progress bar too
    stages[0].update(data={"path": str(moved), "root": str(world)}, eval={"data": str(world / "val.jsonl"), "limit": 4})
    capsys.readouterr()
    train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run2", stages,
                                                           final_eval={"data": str(world / "val.jsonl"), "limit": 4})),
          progress=False)
    printed = capsys.readouterr().out
    assert "[s step 2] val loss" in printed and "final evaluation:" in printed


def test_a_file_whose_first_samples_are_bad_but_not_the_rest_trains(world, tmp_path):
    """The check before training reads on past a file's first few samples: when those are bad but samples spread
    through the rest of it read, the stage trains, the bad ones skipped and counted (it was refused)."""
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    records = [r for r in records if r["images"]][:12]
    for r in records[:4]:
        r["images"] = ["images/train/does-not-exist.png"]
    (world / "bad_start.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stages = [{"name": "s", "data": str(world / "bad_start.jsonl"), "epochs": 1, "batch_size": 4,
               "lr": {"adapter": 1e-3}}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, log_every=1))
    fusion.trainer.check(config)
    with pytest.warns(DatasetWarning, match="missing image"):
        train(config, progress=False)
    entries = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "train"]
    assert len(entries) == 3 and sum(e["skipped_samples"] for e in entries) == 4
    # evaluation reads its file from the start (the first `limit` samples): there the first ones must read
    stages[0]["eval"] = {"data": str(world / "bad_start.jsonl"), "limit": 4}
    with pytest.raises(ConfigError, match=r"stage 's': none of 4 samples of its eval data .*\(the first 4\) can"):
        fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run2", stages)))


def test_an_evaluation_stopped_by_bad_samples_does_not_end_the_run(world, tmp_path):
    """An eval file whose first samples read (so the check before training passes) but most of whose others are
    bad: the evaluation stops, the run warns that no accuracy was measured, and it trains to its end and saves."""
    from fusion.trainer import TrainingWarning

    records = [json.loads(line) for line in (world / "val.jsonl").read_text().splitlines()]
    records = [r for r in records if r["images"]][:8]
    for r in records[3:]:
        r["images"] = ["images/val/does-not-exist.png"]
    (world / "mostly_bad_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3},
               "eval": {"data": str(world / "mostly_bad_val.jsonl")}}]
    config = base_config(world, tmp_path / "run", stages, final_eval={"data": str(world / "mostly_bad_val.jsonl")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        with pytest.warns(TrainingWarning) as caught:
            final = train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
    messages = [str(w.message) for w in caught]
    assert any("stage 's' step 2: no accuracy measured" in m and "5 of the 8 samples were bad" in m for m in messages)
    assert any("final_eval: no evaluation written" in m for m in messages)
    assert (final / "model.safetensors").is_file() and not (tmp_path / "run" / "eval.json").exists()


def test_an_evaluation_answers_its_batch_size_of_questions_at_a_time(world, tmp_path, monkeypatch):
    """`eval: {batch_size: N}` answers N questions per generation (16 by default); the accuracy is the same."""
    chat = fusion.FusionModel.chat
    batches = []

    def counted(self, conversations, *args, **kwargs):
        batches.append(len(conversations))
        return chat(self, conversations, *args, **kwargs)

    monkeypatch.setattr(fusion.FusionModel, "chat", counted)
    accuracy = {}
    for size in (None, 3):
        spec = {"data": str(world / "val.jsonl"), "limit": 12, **({"batch_size": size} if size else {})}
        stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 1, "batch_size": 4,
                   "lr": {"decoder": 1e-3}, "eval": spec}]
        batches.clear()
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / str(size), stages)), progress=False)
        assert sum(batches) == 12, batches  # (the first 12 samples are 12 generations here)
        assert max(batches) == 3 if size else max(batches) > 3, batches
        accuracy[size] = [e for e in read_metrics(tmp_path / str(size) / "metrics.jsonl") if e["kind"] == "eval"][0]
    assert accuracy[3]["accuracy"] == accuracy[None]["accuracy"] and accuracy[3]["accuracy"]


def _run_cli(args, env=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "fusion.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_the_command_that_continues_a_stopped_run_keeps_its_settings_and_says_torchrun(monkeypatch):
    """What a stopped `fusion train` prints to continue: the config and every --set (quoted for the shell), with
    --resume; under torchrun it says to run it so again."""
    from argparse import Namespace

    args = Namespace(config="my run.yaml", set=["output_dir=runs/b", "stages.s.steps=9"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    expected = "fusion train 'my run.yaml' --set output_dir=runs/b --set stages.s.steps=9 --resume"
    assert fusion.cli.resume_command(args) == expected
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fusion.cli.resume_command(args) == expected + " (under torchrun, as this run was started)"


def _stopped_run_stages(world):
    return [{"name": "trunk", "data": str(world / "text.jsonl"), "steps": 4, "batch_size": 4, "lr": {"decoder": 1e-3}},
            {"name": "cotrain", "data": str(world / "train.jsonl"), "steps": 14, "batch_size": 4,
             "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 5e-4}}]


@pytest.fixture(scope="module")
def uninterrupted_run(world, tmp_path_factory):
    """The run folder of `_stopped_run_stages` trained by `fusion train` without a stop (shared by the stop tests)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(out / "ref.yaml", base_config(world, out / "ref", _stopped_run_stages(world),
                                                        checkpoint_every=3, threads=1))
    assert _run_cli(["train", str(config), "--no-progress"]).wait(timeout=300) == 0
    return out / "ref"


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_sigkill_then_resume_continues_exactly(world, tmp_path, stop, uninterrupted_run):
    """Killed (SIGKILL: from its last checkpoint) or stopped (SIGTERM, as a scheduler preempts: it writes a
    checkpoint at the step it is on and exits 143), then --resume: the losses of an uninterrupted run."""
    killed = write_config(tmp_path / "kill.yaml", base_config(world, tmp_path / "kill", _stopped_run_stages(world),
                                                              checkpoint_every=3, threads=1))
    proc = _run_cli(["train", str(killed), "--set", "log_every=1", "--no-progress"])  # the config's own value
    latest = tmp_path / "kill" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it mid-way through stage 2, after a checkpoint
        if latest.exists() and json.loads(latest.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, stop))
    output = proc.communicate(timeout=300)[0].decode()
    done = len(losses(tmp_path / "kill"))
    assert 10 <= done < 18, f"the run should have been killed mid-way, it logged {done} steps"
    if stop == "SIGTERM":  # nothing lost: the checkpoint is at the last step it logged
        assert proc.returncode == 128 + signal.SIGTERM, output
        assert json.loads(latest.read_text())["step"] == done
        assert f"stopped on SIGTERM after stage 'cotrain' step {done - 4} (run step {done})" in output
        assert "Traceback" not in output
        # the command it prints to continue keeps the --set changes (an output_dir among them would name the run)
        line = f"to continue this run: fusion train {killed} --set log_every=1 --resume\n"
        assert line in output, output  # (nothing after it: "under torchrun" only where it ran so)
        resume_args = shlex.split(line.split(": ", 1)[1])[1:]
    else:
        resume_args = ["train", str(killed), "--resume"]
    checkpoint = tmp_path / "kill" / "checkpoints" / json.loads(latest.read_text())["folder"]
    before_kill = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["wall_seconds"]
    assert before_kill > 0
    resume = _run_cli([*resume_args, "--no-progress"])
    output = resume.communicate(timeout=300)[0].decode()
    assert resume.returncode == 0, output
    assert "differs" not in output  # the same config: no warning about changes

    ref, resumed = losses(uninterrupted_run), losses(tmp_path / "kill")
    assert [s for s, _ in resumed] == [s for s, _ in ref] == list(range(1, 19))
    for (step, a), (_, b) in zip(ref, resumed):
        assert a == pytest.approx(b, rel=1e-6), f"step {step}: {a} vs {b}"
    # the summary of the resumed run counts the killed part's time up to its last checkpoint too
    summary = json.loads((tmp_path / "kill" / "run_summary.json").read_text())
    assert summary["resumed"] is True
    assert summary["wall_seconds_total"] == pytest.approx(before_kill + summary["wall_seconds"], abs=5.0)
    assert summary["wall_seconds_total"] > summary["wall_seconds"] > 0


def ctrl_c_at_step(monkeypatch, step: int) -> None:
    """Send this process SIGINT (Ctrl-C) during the forward pass of training step `step`."""

    forward, calls = TrainingStep.forward, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args)

    monkeypatch.setattr(TrainingStep, "forward", interrupted)


def test_ctrl_c_in_python_stops_after_the_step_with_a_checkpoint(world, tmp_path, monkeypatch):
    """Ctrl-C (a notebook's interrupt) while train() runs: the step finishes, a checkpoint is written, and
    TrainingStopped says how to continue; Python's own SIGINT handler is back afterwards."""
    from fusion.errors import TrainingStopped
    from fusion.trainer import TrainingWarning

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 6, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    ctrl_c_at_step(monkeypatch, 2)
    handler = signal.getsignal(signal.SIGINT)
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages))
    with pytest.raises(TrainingStopped, match=r"stopped on SIGINT after stage 's' step 2 .*resume=True"):
        train(config, progress=False)
    assert signal.getsignal(signal.SIGINT) is handler
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 2
    longer = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [{**stages[0], "steps": 7}]))
    with pytest.warns(TrainingWarning, match=r"--resume with a config that differs .*stages\[0\]\.steps: 6 -> 7"):
        final = train(longer, resume=True, progress=False)
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 8)) and (final / "model.safetensors").exists()


def test_resume_goes_on_with_an_edited_learning_rate_and_refuses_other_trained_parts(world, tmp_path, monkeypatch):
    """--resume mid-stage after the stage's rates were edited: the warning says the run goes on with the new
    ones, and it does (the schedule of an uninterrupted run with the new rates); a changed set of trained
    parts cannot continue the optimizer's state and is named; a data file whose sample count changed is
    warned about (the rest of the epoch comes in a new order)."""
    from fusion.errors import ConfigError
    from fusion.trainer import TrainingWarning

    data = tmp_path / "text.jsonl"
    shutil.copy(world / "text.jsonl", data)
    stage = {"name": "s", "data": str(data), "steps": 4, "batch_size": 4, "warmup_steps": 1,
             "lr": {"decoder": 1e-3}}
    faster = {**stage, "lr": {"decoder": 5e-2}}
    train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "ref", [faster])), progress=False)
    ctrl_c_at_step(monkeypatch, 2)
    with pytest.raises(fusion.errors.TrainingStopped):
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [stage])), progress=False)
    monkeypatch.undo()

    more_parts = {**stage, "lr": {"decoder": 1e-3, "adapter": 1e-3}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        with pytest.raises(ConfigError, match=r"stage 's': --resume from .* trained decoder, but its lr now trains "
                                              r"adapter, decoder"):
            train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [more_parts])),
                  resume=True, progress=False)

    with data.open("a") as f:  # the file grew since the checkpoint
        f.write((world / "text.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.warns(TrainingWarning) as caught:
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [faster])), resume=True,
              progress=False)
    messages = [str(w.message) for w in caught]
    assert any("lr.decoder: 0.001 -> 0.05. The run goes on with the new one" in m for m in messages)
    assert any("--resume with 201 samples in the stage's data, where the checkpoint's run had 200" in m
               for m in messages)

    def rates(out):
        return [e["lr"]["decoder"] for e in read_metrics(out / "metrics.jsonl") if e["kind"] == "train"]

    resumed, reference = rates(tmp_path / "run"), rates(tmp_path / "ref")
    assert resumed[:2] == [1e-3 * r / 5e-2 for r in reference[:2]] and resumed[2:] == reference[2:]


def test_resume_of_a_finished_run_says_a_longer_finished_stage_is_not_trained_again(world, tmp_path, capsys):
    """A finished run resumed with a longer stage: nothing is silently left out of the warning (a finished
    stage keeps no optimizer state and is not trained again, and the warning says how to train more), and
    a run whose checkpoints were deleted is not silently trained again from scratch over its final model."""
    from fusion.errors import ConfigError
    from fusion.trainer import TrainingWarning

    stage = {"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}
    out = tmp_path / "run"
    train(fusion.trainer.TrainConfig.from_dict(base_config(world, out, [stage])), progress=False)
    longer = fusion.trainer.TrainConfig.from_dict(base_config(world, out, [{**stage, "steps": 5}]))
    with pytest.warns(TrainingWarning, match=r"concern stages the run has finished \('s'\) and change nothing: "
                                             r"stages\[0\]\.steps: 2 -> 5\. A finished stage is not trained again"):
        train(longer, resume=True, progress=False)
    assert [s for s, _ in losses(out)] == [1, 2]
    assert "--resume: every stage of this run had finished (run step 2): nothing was trained" in capsys.readouterr().out
    more = fusion.trainer.TrainConfig.from_dict(base_config(world, out, [stage, {**stage, "name": "more"}]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        train(more, resume=True, progress=False)  # a stage added after the finished ones trains
    assert "nothing was trained" not in capsys.readouterr().out
    assert [(e["stage"], e["step"]) for e in read_metrics(out / "metrics.jsonl") if e["kind"] == "train"] == [
        ("s", 1), ("s", 2), ("more", 3), ("more", 4)]

    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ConfigError, match=r"holds a finished run \(its final model\) but no checkpoint.*--overwrite"):
        train(more, resume=True, progress=False)
    assert (out / "final" / "model.safetensors").exists() and len(losses(out)) == 4


def test_sigterm_to_the_process_group_with_loader_workers_stops_with_a_checkpoint(world, tmp_path):
    """A scheduler preempting a job signals its whole process group, DataLoader workers included: the
    workers leave the signal to the main process, which stops after its step with a checkpoint (exit 143)
    instead of crashing on a killed worker and losing the steps since the last checkpoint."""
    stages = [{"name": "s", "data": str(world / "train.jsonl"), "steps": 200, "batch_size": 4,
               "lr": {"vision": 1e-3, "adapter": 1e-3}}]
    config = write_config(tmp_path / "run.yaml", base_config(world, tmp_path / "run", stages, num_workers=2,
                                                             threads=1))
    proc = _run_cli(["train", str(config), "--no-progress"], start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(losses(tmp_path / "run")) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and output.count("SIGTERM: stopping after this step") == 1, output
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == len(losses(tmp_path / "run")) >= 2


def test_a_later_stage_with_fewer_samples_than_one_batch_fails_before_training(world, tmp_path):
    """A stage whose data cannot fill one batch fails when the run starts (or in --check), naming the stage,
    not after the stages before it have trained."""
    from fusion.errors import DatasetError

    small = tmp_path / "small.jsonl"
    small.write_text("".join((world / "text.jsonl").read_text().splitlines(keepends=True)[:3]))
    first = {"name": "one", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [
        first, {**first, "name": "two", "data": str(small)}]))
    with pytest.raises(DatasetError, match=r"stage 'two': its data has 3 samples, fewer than one batch of 4"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "stages").exists()
    # grouped by image, a file of many lines may still hold fewer samples than a batch: --check counts them
    grouped = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [
        first, {"name": "two", "data": str(world / "train.jsonl"), "group_by_media": True, "steps": 2,
                "batch_size": 40, "lr": {"vision": 1e-3, "adapter": 1e-3}}]))
    with pytest.raises(DatasetError, match=r"stage 'two': its data has \d+ samples, fewer than one batch of 40"):
        fusion.trainer.check(grouped)
    # the bound at the start counts a LLaVA JSON file's entries, and a file's repeats
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"image": "images/x.png", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]}]))
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [
        first, {**first, "name": "two", "data": str(llava)}]))
    with pytest.raises(DatasetError, match=r"stage 'two': its data has 1 samples, fewer than one batch of 4"):
        train(config, progress=False)
    repeated = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [
        first, {**first, "name": "two", "data": [{"path": str(small), "repeat": 2}]}]))
    # (6 samples: one full batch of 4 per pass, so 2 steps are 2 epochs)
    assert "stage 'two': 2 steps of 4 samples = 2.00 epochs of its 6" in fusion.trainer.check(repeated)


def test_the_plot_shows_each_experts_share_of_image_and_text_tokens():
    """metrics.png has a third panel where the log has router loads: each expert's share of the routed image
    tokens and of the text tokens, averaged over the MoE layers, step by step."""
    from fusion.run_log import metrics_figure

    entries = [{"kind": "train", "stage": "s", "step": step, "loss": 1.0,
                "router_load": {"image": [[0.9, 0.1], [0.7, 0.3]], "text": [[0.2, 0.8], [0.4, 0.6]]}}
               for step in (1, 2)] + [{"kind": "eval", "stage": "s", "step": 2, "val_loss": 1.0, "accuracy": {}}]
    figure = metrics_figure(entries)
    assert len(figure.axes) == 3
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[2].get_lines()}
    expected = {"expert 0, image": 0.8, "expert 1, image": 0.2, "expert 0, text": 0.3, "expert 1, text": 0.7}
    assert lines.keys() == expected.keys()
    assert all(lines[name] == pytest.approx([share, share]) for name, share in expected.items())
    assert len(metrics_figure([{**e, "router_load": None} for e in entries]).axes) == 2  # a dense model: no panel


def test_the_plot_and_the_metrics_log_never_end_a_run(tmp_path, monkeypatch):
    """A log whose every loss is missing (every step skipped) still plots; a log line that cannot be written
    (a full disk) is a warning, the run goes on."""
    import errno

    from fusion.run_log import MetricsLog, plot_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(kind="train", stage="s", step=1, loss=None)
    log.write(kind="train", stage="s", step=2, loss=None)
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png").stat().st_size > 0

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", disk_full)
    with pytest.warns(RuntimeWarning, match=r"could not append to the metrics log .*No space left.*goes on"):
        log.write(kind="train", stage="s", step=3, loss=1.0)


@pytest.mark.parametrize("writer", ["trainer state", "weights", "optimizer state"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_leaves_the_last_one_intact(world, tmp_path,
                                                                                         monkeypatch, writer):
    """A full disk while a checkpoint is written (its trainer state by torch.save, its weights by safetensors,
    which raises its own error type, not an OSError, or its optimizer state by torch.distributed.checkpoint,
    which raises its CheckpointException): the run stops with a message naming the intact checkpoint, nothing
    half-written is left, and --resume from it finishes the run."""
    import errno

    import torch.distributed.checkpoint as dcp
    from safetensors import SafetensorError

    import fusion.checkpoint
    from fusion.errors import CheckpointError

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 6, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, checkpoint_every=2))
    calls = []

    def disk_full_at_the_second_checkpoint(write, folder_of):
        def failing(*args, **kwargs):
            if folder_of(*args) is None:  # (not a checkpoint's file: torch.save into memory)
                return write(*args, **kwargs)
            calls.append(folder_of(*args))
            if len(calls) == 2:
                Path(folder_of(*args), "half").write_bytes(b"half")  # written before the disk filled up
                if writer == "weights":  # as safetensors reports it
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(*args, **kwargs)
        return failing

    if writer == "trainer state":
        monkeypatch.setattr(torch, "save", disk_full_at_the_second_checkpoint(
            torch.save, lambda obj, f: Path(f).parent if isinstance(f, (str, Path)) else None))
    elif writer == "weights":
        monkeypatch.setattr(fusion.checkpoint, "save_file", disk_full_at_the_second_checkpoint(
            fusion.checkpoint.save_file, lambda tensors, f: Path(f).parent))
    else:
        monkeypatch.setattr(dcp.FileSystemWriter, "write_data", disk_full_at_the_second_checkpoint(
            dcp.FileSystemWriter.write_data, lambda self, *rest: self.path))
    with pytest.raises(CheckpointError, match=r"checkpoint of step 4 .*No space left on device.*the checkpoint of "
                                              r"step 2 .*step-0000002\) is intact.*--resume"):
        train(config, progress=False)
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-0000002"]  # no temporary folder
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 2
    final = train(config, resume=True, progress=False)
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 7)) and (final / "model.safetensors").exists()


def test_a_checkpoint_holding_the_whole_optimizer_state_in_its_trainer_state_still_resumes_exactly(world, tmp_path):
    """Checkpoints of fusion before 2026-12-03 keep the whole optimizer state in `trainer_state.pt` (no `optimizer`
    folder): --resume from one gives the losses of the uninterrupted run."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from fusion.trainer import OPTIMIZER_STATE, TRAINER_STATE

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 4, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, checkpoint_every=2,
                                                              keep_checkpoints=5))
    train(config, progress=False)
    uninterrupted = losses(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    dcp_to_torch_save(checkpoint / OPTIMIZER_STATE, tmp_path / "optimizer.pt")  # the old layout: one whole state
    state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
    state["optimizer"] = torch.load(tmp_path / "optimizer.pt", weights_only=False)["optimizer"]
    del state["optimizer_parts"]
    torch.save(state, checkpoint / TRAINER_STATE)
    shutil.rmtree(checkpoint / OPTIMIZER_STATE)
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(json.dumps({"folder": checkpoint.name, "step": 2}))
    train(config, resume=True, progress=False)
    assert losses(tmp_path / "run") == uninterrupted


def test_a_json_file_that_cannot_be_written_keeps_its_old_content(tmp_path):
    from fusion.checkpoint import write_json

    path = tmp_path / "latest.json"
    write_json(path, {"step": 2})
    with pytest.raises(TypeError):
        write_json(path, {"step": object()})  # fails halfway through writing
    assert json.loads(path.read_text()) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"]


def test_resume_drops_a_metrics_line_that_the_kill_tore_in_half(tmp_path):
    from fusion.run_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "train", "step": 2, "loss": 0.5}\n'
                    '{"kind": "train", "step": 3, "lo')  # killed while writing step 3
    assert [e["step"] for e in read_metrics(path)] == [1, 2]
    log = MetricsLog(path, resume_from_step=1)  # the checkpoint was at step 1
    log.write(kind="train", step=2, loss=0.4)
    assert read_metrics(path) == [{"kind": "train", "step": 1, "loss": 1.0}, {"kind": "train", "step": 2, "loss": 0.4}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_resume_from_a_damaged_checkpoint_falls_back_to_the_one_before(world, tmp_path, monkeypatch):
    """The checkpoint latest.json names cannot be read (a half-copied run folder): --resume warns and continues
    from the newest one that can; with none readable it says to start again."""
    from fusion.errors import CheckpointError, TrainingStopped
    from fusion.trainer import TrainingWarning

    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 6, "batch_size": 4, "lr": {"decoder": 1e-3}}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, checkpoint_every=2))
    ctrl_c_at_step(monkeypatch, 5)
    with pytest.raises(TrainingStopped):
        train(config, progress=False)
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 5
    state = checkpoints / "step-0000005" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short
    with pytest.warns(TrainingWarning, match=r"step-0000005 cannot be read .*resuming from .*step-0000004 instead"):
        final = train(config, resume=True, progress=False)
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 7)) and (final / "model.safetensors").exists()

    (checkpoints / "latest.json").write_text("{")
    for folder in checkpoints.glob("step-*"):
        (folder / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"latest.json cannot be read .*no other checkpoint .*--overwrite"):
        train(config, resume=True, progress=False)


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "model/tokenizer.json", "optimizer/__0_0.distcp",
                                     "optimizer/.metadata"])
def test_resume_falls_back_past_a_checkpoint_whose_weights_or_tokenizer_are_cut_short(tmp_path, damaged):
    """A half-copied run folder whose newest checkpoint has its weights, tokenizer or optimizer state cut short:
    the checkpoint is found unreadable before the run starts from it, and the one before is taken with a
    warning."""
    from types import SimpleNamespace

    from fusion.checkpoint import write_json
    from fusion.distributed import save_optimizer_state
    from fusion.trainer import OPTIMIZER_STATE, TRAINER_STATE, Trainer, TrainingWarning
    from tests.tiny_models import tiny_fusion_model
    from tokenizer import FusionTokenizer

    model = tiny_fusion_model(FusionTokenizer.train(["a red circle", "a blue square"] * 20, vocab_size=280))
    optimizer = torch.optim.AdamW([{"params": list(model.decoder.parameters()), "part": "decoder"}])
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4):
        folder = checkpoints / f"step-{step:07d}"
        model.save_pretrained(folder / "model")
        save_optimizer_state(model, optimizer, folder / OPTIMIZER_STATE)
        torch.save({"progress": {"stage_index": 0, "step": step, "global_step": step},
                    "optimizer_parts": ["decoder"]}, folder / TRAINER_STATE)
    write_json(checkpoints / "latest.json", {"folder": "step-0000004", "step": 4})
    file = checkpoints / "step-0000004" / damaged
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])  # half-copied
    with pytest.warns(TrainingWarning, match=rf"step-0000004 cannot be read .*{re.escape(file.name)}.*resuming "
                                             rf"from .*step-0000002 instead"):
        state = Trainer._latest_state(SimpleNamespace(out=tmp_path))
    assert state["folder"] == checkpoints / "step-0000002" and state["progress"]["step"] == 2


def test_resume_removes_the_temporary_copies_that_a_killed_run_left(world, tmp_path, capsys):
    """A run killed while it wrote a checkpoint or a model leaves hidden temporary copies (a checkpoint's size
    each): the next start removes those the run named so, with a line saying so, and nothing else."""
    stage = {"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}
    out = tmp_path / "run"
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, out, [stage], checkpoint_every=1))
    train(config, progress=False)
    checkpoints = out / "checkpoints"
    stale = [checkpoints / ".step-0000003.tmp-x8_k2abc", checkpoints / ".step-0000002.old-4242",
             checkpoints / ".latest.json.tmp-4242", out / ".final.tmp-q1w2e3r4", out / "stages" / ".s.old-ab12cd34",
             out / ".train_config.json.tmp-77", out / "final" / ".fusion-save-k3j4h5g6"]
    kept = [checkpoints / ".step-0000009.old-4242",  # the only copy of a checkpoint whose swap was cut short
            checkpoints / "notes.tmp-1", out / ".my-own.tmp-1", out / "stages" / ".other.tmp-abc"]
    for path in stale + kept:
        if path.name.startswith((".latest", ".train")) or path.name.endswith("tmp-1"):
            path.write_text("{")
        else:
            shutil.copytree(checkpoints / "step-0000002", path)
    capsys.readouterr()
    train(config, resume=True, progress=False)
    output = capsys.readouterr().out
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert (f"removed 3 temporary copies that an interrupted write left in {checkpoints}: .latest.json.tmp-4242, "
            f".step-0000002.old-4242, .step-0000003.tmp-x8_k2abc") in output
    assert f"removed 2 temporary copies that an interrupted write left in {out}: .final.tmp-q1w2e3r4" in output
    assert f"removed 1 temporary copy that an interrupted write left in {out / 'stages'}: .s.old-ab12cd34" in output
    assert f"removed 1 temporary copy that an interrupted write left in {out / 'final'}: .fusion-save-k3j4h5g6" \
        in output


def test_resume_in_a_stage_the_config_no_longer_has_says_which_stage(world, tmp_path, monkeypatch):
    """A run stopped in its second stage, resumed with a config that lists only the first: the error names the
    checkpoint's stage and says what to do (not an IndexError); so does a run that finished that stage."""
    from fusion.errors import TrainingStopped

    first = {"name": "a", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}
    second = {**first, "name": "b", "steps": 3}
    out = tmp_path / "run"
    both = fusion.trainer.TrainConfig.from_dict(base_config(world, out, [first, second]))
    only_first = fusion.trainer.TrainConfig.from_dict(base_config(world, out, [first]))
    ctrl_c_at_step(monkeypatch, 3)  # step 1 of stage b
    with pytest.raises(TrainingStopped):
        train(both, progress=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"checkpoint .*step-0000003 is in stage 2 \('b'\) at its step 1 \(run step "
                                          r"3\), but the config lists only 1 stage; put that stage back .*--overwrite"):
        train(only_first, resume=True, progress=False)
    train(both, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"step-0000005 is at the end of stage 2 \('b'\) \(run step 5\), but the "
                                          r"config lists only 1 stage"):
        train(only_first, resume=True, progress=False)


def test_resume_on_a_machine_with_fewer_gpus_sets_the_random_state_of_those_it_has(monkeypatch):
    """A checkpoint written where two GPUs were visible, resumed where one is: each GPU there gets its state (the
    checkpoint's GPU 0 state for GPU 0), and the one GPU more of the checkpoint does not fail the resume."""
    from fusion.trainer import _rng_state, _set_rng_state

    set_states = []

    def set_rng_state(state, device=0):
        if int(device) >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        set_states.append((int(device), state))

    state = _rng_state()
    state["cuda"] = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    _set_rng_state(state)
    assert [(device, int(s[0])) for device, s in set_states] == [(0, 1)]
    set_states.clear()
    _set_rng_state({**state, "cuda": state["cuda"][:1]})  # fewer saved than visible: those saved
    assert [(device, int(s[0])) for device, s in set_states] == [(0, 1)]


@pytest.fixture(scope="module")
def torchrun_inductor_cache(tmp_path_factory):
    """An inductor cache shared by the compiled torchrun runs (their kernels are largely the same), private to
    this test session: entries written under pytest can name this conftest, and a later process that loads one
    imports it (see test_a_compiled_stage_trains_like_an_eager_one)."""
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture
def without_inductor_kernels(monkeypatch):
    """The compiled torchrun runs of this test take their blocks' graphs through dynamo and AOTAutograd (the
    gradients, the collectives' hooks around them: what DDP and FSDP2 meet) but run them without inductor's
    kernels (`TORCH_COMPILE_OVERRIDE_BACKENDS`, torch's own switch for narrowing down a compile problem; a
    torch without it builds the kernels). Building them is most of a minute per kind of block on this CPU;
    they are tested in one process (test_a_compiled_stage_trains_like_an_eager_one)."""
    monkeypatch.setenv("TORCH_COMPILE_OVERRIDE_BACKENDS", ">=0:aot_eager")


def train_one_and_two_processes(one, two, inductor_cache=None, timeout=300):
    """`fusion train one` in a single process, then `two` under a 2-process torchrun (`torchrun_two_processes`)."""
    assert _run_cli(["train", str(one), "--no-progress"]).wait(timeout=300) == 0
    train_two_processes(two, inductor_cache, timeout)


def train_two_processes(config, inductor_cache=None, timeout=300):
    """`fusion train config` under a 2-process torchrun (`torchrun_two_processes`)."""
    output = torchrun_two_processes(["train", str(config), "--no-progress"], inductor_cache, timeout)
    assert output.count("final model: ") == 1, output[-3000:]  # said once, not by every process


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """`one_process_run(name, config)`: the folder of `fusion train` (one process) run on `config` (a dict whose
    `output_dir` it sets), trained once per module and name: the DDP and FSDP2 cases of a test share it."""
    folders = {}

    def run(name, config):
        if name not in folders:
            folder = tmp_path_factory.mktemp(name) / "run"
            path = write_config(folder.parent / "config.yaml", {**config, "output_dir": str(folder)})
            training = _run_cli(["train", str(path), "--no-progress"], text=True)
            output, _ = training.communicate(timeout=300)
            assert training.returncode == 0, output[-3000:]
            folders[name] = folder
        return folders[name]

    return run


def assert_same_trained_weights(folder, reference_folder, parameters_only=False):
    """The model saved in `folder` (loaded in one process) has the weights of `reference_folder`'s up to float
    rounding. Adam turns rounding differences of near-zero gradients into steps of up to lr (1e-3) on a few
    elements, so each element is held to 3e-3, and the mean difference to 3e-5: a 2-process run differs from
    one process by ~7e-6 on average, while one optimizer step more or less moves the weights by ~3e-4."""
    model, reference = (fusion.FusionModel.from_pretrained(f) for f in (folder, reference_folder))
    pairs = list(zip(model.named_parameters(), reference.parameters())) if parameters_only else \
        list(zip(model.state_dict().items(), reference.state_dict().values()))
    for (name, p), q in pairs:
        assert torch.allclose(p, q, atol=3e-3), name
    differences = torch.cat([(p.detach().float() - q.detach().float()).abs().flatten() for (_, p), q in pairs
                             if p.is_floating_point()])
    assert float(differences.mean()) < 3e-5, float(differences.mean())


def torchrun_two_processes(args, inductor_cache=None, timeout=300, program=("-m", "fusion.cli")) -> str:
    """`fusion ARGS` (or `program ARGS`, e.g. a script) under a 2-process torchrun (gloo, 1 thread each); its
    output. A torchrun that does not end in `timeout` seconds (collectives waiting on each other) is killed with
    its workers and fails the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if inductor_cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 *program, *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = torchrun.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(torchrun.pid, signal.SIGKILL)
        output, _ = torchrun.communicate()
        pytest.fail(f"the 2-process run did not end in {timeout} s:\n{output[-3000:]}")
    assert torchrun.returncode == 0, output[-6000:]
    # every trained parameter is used in every forward (DDP has no unused ones to look for), and the vision
    # tower hands FSDP2 a tensor of its own, not a view
    for warning in ("find_unused_parameters=True was specified", "returned a view tensor"):
        assert warning not in output, output[-3000:]
    return output


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_one_process_checkpoint_resumes_in_two_processes_exactly(world, tmp_path, monkeypatch, strategy):
    """A run stopped at step 2 in one process, resumed under a 2-process torchrun (DDP, or FSDP2 which shards
    the checkpoint's weights and optimizer state, each process reading its part of every weight only): the
    losses and the evaluations (the stage's, the final one) of the uninterrupted one-process run. Under FSDP2
    the processes evaluate together on their shards (no process gathers or reads the whole model), each
    answering its share of every batch: a share with a bad sample, a share with none left, all in step."""
    from fusion.errors import TrainingStopped

    records = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    for record in records:
        record["images"] = [str(world / p) for p in record["images"]]
        record["videos"] = [str(world / p) for p in record["videos"]]
    for i in [i for i, r in enumerate(records) if r["images"]][2:4]:  # two cannot be read (found by each process)
        records[i]["images"] = [str(tmp_path / "missing.png")]
    records[0]["conversations"][-1]["content"] = " "  # and one has no answer to score against (found before any)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stage = {"name": "all", "data": str(world / "train.jsonl"), "steps": 5, "batch_size": 8,
             "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3},
             "eval": {"data": str(world / "val.jsonl"), "limit": 6}}
    final_eval = {"data": str(tmp_path / "test.jsonl"), "limit": 12, "batch_size": 1}  # (a question a process)
    reference = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "ref", [stage], threads=1,
                                                                 final_eval=final_eval))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)  # (the bad samples, as the two processes find them too)
        train(reference, progress=False)
    ctrl_c_at_step(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [stage], threads=1,
                                                               final_eval=final_eval)), progress=False)
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2]
    two = write_config(tmp_path / "two.yaml", base_config(world, tmp_path / "run", [stage], threads=1,
                                                          distributed={"strategy": strategy}, final_eval=final_eval))
    if strategy == "fsdp2":  # each process reads its shard of every weight of the checkpoint only
        output = train_sharded_in_two_processes(two, tmp_path, resume=True)
        answered = [{q for q in json.loads((tmp_path / f"answered{rank}.json").read_text())
                     if json.loads(q)[0] != [{"role": "user", "content": "?"}]} for rank in (0, 1)]  # (no stand-in)
        assert answered[0] and answered[1] and not answered[0] & answered[1]  # each question by one process
    else:
        output = torchrun_two_processes(["train", str(two), "--resume", "--no-progress"])
        assert output.count("final model: ") == 1, output[-3000:]
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert [s for s, _ in b] == [1, 2, 3, 4, 5]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"step {step}: uninterrupted {x}, resumed in 2 processes {y}"
    evals = [[e for e in read_metrics(tmp_path / out / "metrics.jsonl") if e["kind"] == "eval"]
             for out in ("ref", "run")]
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [5]
    assert evals[1][0]["val_loss"] == pytest.approx(evals[0][0]["val_loss"], rel=1e-4)
    assert evals[1][0]["accuracy"] == evals[0][0]["accuracy"] and evals[0][0]["accuracy"]
    finals = [json.loads((tmp_path / out / "eval.json").read_text()) for out in ("ref", "run")]
    assert finals[1]["tasks"] == finals[0]["tasks"] and finals[1]["counts"] == finals[0]["counts"]
    assert finals[0]["counts"]["skipped"] == 3 and finals[0]["counts"]["evaluated"] > 0
    # each bad sample of the final evaluation said once, whichever process found it
    said = re.findall(r"DatasetWarning: .*test\.jsonl: skipped sample (\S+) ", output)
    assert sorted(said) == sorted(repr(e["id"]) for e in finals[0]["skipped_samples"]), output[-3000:]
    assert_same_trained_weights(tmp_path / "run" / "final", tmp_path / "ref" / "final")


def test_an_fsdp2_checkpoint_holds_each_process_part_of_the_optimizer_state_and_resumes_in_one_process(world,
                                                                                                     tmp_path):
    """Under FSDP2 each of 2 processes writes its own part of the optimizer state into the checkpoint (two files,
    each holding a part of the rows of every moment, so no process gathered it whole), and one process resumes from that
    checkpoint with the 2-process run's losses."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from fusion.trainer import TrainingWarning

    stage = {"name": "all", "data": str(world / "train.jsonl"), "steps": 5, "batch_size": 8,
             "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}
    two = write_config(tmp_path / "two.yaml", base_config(world, tmp_path / "run", [stage], threads=1,
                                                          checkpoint_every=2, keep_checkpoints=5,
                                                          distributed={"strategy": "fsdp2"}))
    output = torchrun_two_processes(["train", str(two), "--no-progress"])
    assert output.count("final model: ") == 1, output[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (checkpoint / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    index = dcp.FileSystemReader(str(checkpoint / "optimizer")).read_metadata()
    model = fusion.FusionModel.from_pretrained(checkpoint / "model")  # the checkpoint's model loads in one process
    for name, weight in model.named_parameters():  # each AdamW moment as two parts of its rows, one per file
        for moment in ("exp_avg", "exp_avg_sq"):
            fqn = f"optimizer.state.{name}.{moment}"
            chunks = index.state_dict_metadata[fqn].chunks
            files = {index.storage_data[MetadataIndex(fqn, chunk.offsets)].relative_path for chunk in chunks}
            if weight.shape[0] > 1:
                assert len(chunks) == 2 and files == {"__0_0.distcp", "__1_0.distcp"}, (fqn, chunks, files)
                assert sum(chunk.sizes[0] for chunk in chunks) == weight.shape[0], fqn
    two_processes = losses(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(json.dumps({"folder": checkpoint.name, "step": 2}))
    with pytest.warns(TrainingWarning, match=r'distributed.strategy: "fsdp2" -> "ddp"'):
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [stage], threads=1)),
              resume=True, progress=False)
    one_process = losses(tmp_path / "run")
    assert [s for s, _ in one_process] == [1, 2, 3, 4, 5]
    for (step, x), (_, y) in zip(two_processes, one_process):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"step {step}: 2 processes {x}, resumed in 1 process {y}"


needs_cpu_compiler = pytest.mark.skipif(fusion.compilation.cpu_compiler() is None,
                                        reason="compile: true on a CPU needs a C++ compiler (g++ or $CXX); none on PATH")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", pytest.param("ddp+compile", marks=needs_cpu_compiler)])
def test_two_process_torchrun_matches_one_process(world, tmp_path, strategy, torchrun_inductor_cache,
                                                  one_process_run, without_inductor_kernels):
    """2 processes (gloo, CPU) give the 1-process run's losses; with `ddp+compile` the 2 processes run compiled
    decoder blocks (`compile: true`, `without_inductor_kernels`) against an eager 1-process run, both in
    float32."""
    strategy, _, compiled = strategy.partition("+")
    stage = {"name": "all", "data": str(world / "train.jsonl"), "steps": 5, "batch_size": 8,
             "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}
    extra = {"precision": "fp32"} if compiled else {}
    one = one_process_run("fp32" if compiled else "auto", base_config(world, None, [stage], threads=1, **extra))
    two = write_config(tmp_path / "two.yaml", base_config(world, tmp_path / "two", [{**stage, "compile": bool(compiled)}],
                                                          threads=1, distributed={"strategy": strategy}, **extra))
    train_two_processes(two, torchrun_inductor_cache)
    a, b = losses(one), losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"step {step}: 1 process {x}, 2 processes {y}"
    assert_same_trained_weights(tmp_path / "two" / "final", one / "final")  # loads in one process


# Run by each process of the FSDP2 tests below (`run.py CONFIG OUT [--resume]`): training as `fusion train` does,
# with the loaders that read a whole model or trunk and the gathering of a whole model refused; written to
# OUT/rank{N}.json: the parts of the model that held memory when it was sharded (those not read into it by shards)
# and the part of each weight that the process holds once the weights are read.
_SHARDED_RUN = """
import json, os, sys
import fusion.distributed, fusion.hf_llama4, fusion.trainer

def refuse(*args, **kwargs):
    raise AssertionError("a process read or gathered a whole model or trunk")

fusion.hf_llama4.load_hf_decoder = refuse
fusion.FusionModel.from_pretrained = refuse
fusion.distributed.full_model_state = refuse  # models and checkpoints are written a gathered tensor at a time
shard_then_read, shard = fusion.trainer.Trainer._shard_then_read, fusion.trainer.Trainer._shard
allocated_when_sharded = []

def note_and_shard(self, model):
    allocated_when_sharded.extend(n for n, part in model.parts().items() if not next(part.parameters()).is_meta)
    shard(self, model)

def shard_read_and_count(self, model, read):
    model = shard_then_read(self, model, read)
    parameters = dict(model.named_parameters())
    held = {name: (p.to_local() if hasattr(p, "to_local") else p).numel() for name, p in parameters.items()}
    with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({"allocated_when_sharded": allocated_when_sharded, "held": held,
                   "whole": {name: p.numel() for name, p in parameters.items()}}, f)
    return model

fusion.trainer.Trainer._shard = note_and_shard
fusion.trainer.Trainer._shard_then_read = shard_read_and_count
answered = []  # each question this process answered (evaluations), written to OUT/answered{N}.json
chat = fusion.FusionModel.chat

def chat_and_note(self, conversations, images=None, videos=None, **kwargs):
    n = len(conversations)
    answered.extend(json.dumps(q) for q in zip(conversations, images or [[]] * n, videos or [[]] * n))
    return chat(self, conversations, images, videos, **kwargs)

fusion.FusionModel.chat = chat_and_note
fusion.trainer.train(sys.argv[1], resume="--resume" in sys.argv, progress=False)
with open(os.path.join(sys.argv[2], "answered%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(answered, f)
fusion.distributed.shutdown_distributed()
fusion.distributed.end_torchrun_process(0)  # as `fusion train` ends (past gloo's teardown)
"""


def train_sharded_in_two_processes(config, folder, resume=False, built_whole=()) -> str:
    """`config` trained under a 2-process torchrun with `_SHARDED_RUN`; asserts that no part of the model other
    than `built_whole` (parts built from the config, not read) held memory before it was sharded, and that each
    process then held half of each weight (none whole in both). Returns the run's output."""
    (folder / "run.py").write_text(_SHARDED_RUN)
    output = torchrun_two_processes([str(config), str(folder)] + (["--resume"] if resume else []),
                                    program=[str(folder / "run.py")])
    held = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert held[0]["allocated_when_sharded"] == held[1]["allocated_when_sharded"] == list(built_whole)
    whole = held[0]["whole"]
    for name, size in whole.items():  # each weight split between the two processes, none held whole by both
        assert held[0]["held"][name] + held[1]["held"][name] == size, name
        assert held[0]["held"][name] < size or size == 1, name
    assert sum(held[0]["held"].values()) <= 0.6 * sum(whole.values())
    return output


# Run by each process of the gathered-evaluation test (`run.py CONFIG OUT`): training as `fusion train` does,
# noting whenever the last decoder block has run whether the first block's weights were sharded then (all its
# parameters DTensors, its gathered weights freed after its forward), under the forward's kind: "answering"
# (a question of an evaluation), "training" (with gradients) or "val_loss"; written to OUT/seen{N}.json.
_GATHERED_EVAL_RUN = """
import json, os, sys
import torch
from torch.distributed.tensor import DTensor
import fusion.distributed, fusion.trainer

seen = {"answering": [], "training": [], "val_loss": []}
answering = []
shard = fusion.trainer.Trainer._shard

def shard_and_watch(self, model):
    shard(self, model)
    first, last = model.decoder.layers[0], model.decoder.layers[-1]

    def note(module, args, output):
        kind = "answering" if answering else "training" if torch.is_grad_enabled() else "val_loss"
        seen[kind].append(all(isinstance(p, DTensor) for p in first.parameters()))

    last.register_forward_hook(note)

fusion.trainer.Trainer._shard = shard_and_watch
chat = fusion.FusionModel.chat

def chat_and_note(self, *args, **kwargs):
    answering.append(1)
    try:
        return chat(self, *args, **kwargs)
    finally:
        answering.pop()

fusion.FusionModel.chat = chat_and_note
fusion.trainer.train(sys.argv[1], progress=False)
with open(os.path.join(sys.argv[2], "seen%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(seen, f)
fusion.distributed.shutdown_distributed()
fusion.distributed.end_torchrun_process(0)
"""


def test_fsdp2_with_gather_for_eval_answers_with_whole_blocks_then_trains_sharded_as_one_process(world, tmp_path,
                                                                                                one_process_run):
    """`distributed: {strategy: fsdp2, gather_for_eval: true}`: while the processes compute an evaluation's
    validation loss and answer its questions every block's weights stay gathered (a forward gathers nothing),
    and afterwards the run trains as before, each block freeing its gathered weights after its forward; the
    losses, evaluations (during the stage, and the final one) and weights are the one-process run's."""
    stage = {"name": "all", "data": str(world / "train.jsonl"), "steps": 4, "batch_size": 8,
             "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3},
             "eval": {"data": str(world / "val.jsonl"), "every": 2, "limit": 4}}
    final_eval = {"data": str(world / "test.jsonl"), "limit": 4}
    one = one_process_run("gathered-eval", base_config(world, None, [stage], threads=1, final_eval=final_eval))
    two = write_config(tmp_path / "two.yaml", base_config(world, tmp_path / "two", [stage], threads=1,
                                                          final_eval=final_eval,
                                                          distributed={"strategy": "fsdp2", "gather_for_eval": True}))
    (tmp_path / "run.py").write_text(_GATHERED_EVAL_RUN)
    torchrun_two_processes([str(two), str(tmp_path)], program=[str(tmp_path / "run.py")])
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen{rank}.json").read_text())
        assert seen["answering"] and not any(seen["answering"]), seen  # every block held whole
        assert seen["val_loss"] and not any(seen["val_loss"]), seen  # (in the same hold as the answers)
        assert len(seen["training"]) >= 4 and all(seen["training"]), seen  # sharded again after each evaluation
    a, b = losses(one), losses(tmp_path / "two")
    assert [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"step {step}: 1 process {x}, 2 processes {y}"
    evals = [[e for e in read_metrics(out / "metrics.jsonl") if e["kind"] == "eval"] for out in (one, tmp_path / "two")]
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [2, 4]
    for x, y in zip(*evals):
        assert y["accuracy"] == x["accuracy"] and x["accuracy"]
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)
    finals = [json.loads((out / "eval.json").read_text()) for out in (one, tmp_path / "two")]
    assert finals[1]["tasks"] == finals[0]["tasks"] and finals[0]["counts"]["evaluated"] > 0
    assert_same_trained_weights(tmp_path / "two" / "final", one / "final")


def test_fsdp2_on_a_llama4_trunk_reads_each_process_shard_only_and_matches_one_process(world, tmp_path):
    """Under FSDP2 each process reads a `model.trunk` tensor by tensor into its shard (the trunk's decoder is
    sharded before any weight is read; no process loads it whole), and the run (frozen trunk, then everything
    trained) gives the losses and weights of a one-process run."""
    pytest.importorskip("transformers")
    from fusion.stage_setup import _texts_of
    from tests.tiny_models import tiny_llama4_checkpoint

    tiny_llama4_checkpoint(tmp_path / "llama4", _texts_of([world / "text.jsonl", world / "train.jsonl"]))
    stages = [{"name": "cotrain", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 8,
               "lr": {"vision": 1e-3, "adapter": 1e-3}},
              {"name": "unfreeze", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 8,
               "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}]

    def config(out, **extra):
        spec = base_config(world, out, stages, threads=1, precision="fp32", **extra)  # (under bf16 autocast the
        # two runs round apart by 2e-4 from the first unfrozen step on, the trunk read whole or by shards alike)
        del spec["model"]["tokenizer"], spec["model"]["decoder"]
        spec["model"]["trunk"] = str(tmp_path / "llama4")
        return spec

    one = write_config(tmp_path / "one.yaml", config(tmp_path / "one"))
    two = write_config(tmp_path / "two.yaml", config(tmp_path / "two", distributed={"strategy": "fsdp2"}))
    assert _run_cli(["train", str(one), "--no-progress"]).wait(timeout=300) == 0
    train_sharded_in_two_processes(two, tmp_path, built_whole=["vision", "adapter"])  # (new, not read)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"step {step}: 1 process {x}, 2 processes {y}"
    assert_same_trained_weights(tmp_path / "two" / "final", tmp_path / "one" / "final")
    trunk = fusion.Decoder.from_hf(tmp_path / "llama4", dtype=torch.float32).state_dict()
    after_cotrain = fusion.FusionModel.from_pretrained(tmp_path / "two" / "stages" / "cotrain").decoder.state_dict()
    assert all(torch.equal(after_cotrain[k], v) for k, v in trunk.items())  # read exactly, and kept frozen


def test_model_section_mistakes_are_found_before_anything_runs(world, tmp_path):
    """Mistakes under `model:` stop `--check` and the run before anything runs, even where the model cannot be
    built yet (its tokenizer trains on a shapes world still to be generated): a typo'd decoder key, other keys
    beside init_from (they were silently ignored), a tokenizer file that is not there (was a traceback)."""
    stages = [{"name": "s", "data": str(tmp_path / "new_world" / "train.jsonl"), "steps": 1, "batch_size": 2,
               "lr": {"decoder": 1e-3}}]
    config = base_config(world, tmp_path / "run", stages,
                         data={"shapes_world": {"out_dir": str(tmp_path / "new_world"), "train_images": 8}})
    config["model"]["tokenizer"]["train_on"] = [str(tmp_path / "new_world" / "text.jsonl")]
    config["model"]["decoder"]["hiden_size"] = 32
    for run in (fusion.trainer.check, lambda c: train(c, progress=False)):
        with pytest.raises(ConfigError, match=r"model: .*hiden_size"):
            run(fusion.trainer.TrainConfig.from_dict(config))
        assert not (tmp_path / "new_world").exists()  # not generated: the mistake was found first
    del config["model"]["decoder"]["hiden_size"]
    for mistake, message in (({"vision": 5}, r"model.vision must be a mapping of its settings"),
                             ({"video": {"num_frames": 0}}, r"model: VideoSettings: num_frames must be an integer >= 1"),
                             ({"decoder": {"num_layers": 0}}, r"model: invalid DecoderConfig: num_layers must be a "
                                                              r"whole number >= 1, got 0"),
                             ({"vision": {"width": 0}}, r"model: VisionEncoderConfig: width must be a whole number"),
                             ({"adapter_hidden_size": 0}, r"FusionConfig: adapter_hidden_size must be a whole number")):
        with pytest.raises(ConfigError, match=message):
            fusion.trainer.check(fusion.trainer.TrainConfig.from_dict({**config, "model": {**config["model"],
                                                                                          **mistake}}))
    # a final evaluation whose media root is in the world still to be generated is not refused by --check
    pending = {**config, "final_eval": {"data": str(tmp_path / "new_world" / "test.jsonl"),
                                        "root": str(tmp_path / "new_world")}}
    assert "final_eval:" in fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(pending))
    beside_init = base_config(world, tmp_path / "run", stages[:0] + [{**stages[0], "data": str(world / "text.jsonl")}],
                              model={"init_from": "default", "video": {"num_frames": 4}})
    with pytest.raises(ConfigError, match=r"model: init_from loads the saved model as it is, so \['video'\] would"):
        fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(beside_init))
    no_tokenizer = base_config(world, tmp_path / "run", [{**stages[0], "data": str(world / "text.jsonl")}])
    no_tokenizer["model"]["tokenizer"] = {"path": str(tmp_path / "nope.json")}
    with pytest.raises(ConfigError, match=r"model.tokenizer.path: .*nope.json"):
        fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(no_tokenizer))


def test_numbers_written_as_text_under_model_are_numbers(world, tmp_path):
    """YAML 1.1 reads `5e5` as text: under `model:` too it is the number (rope_theta crashed the build,
    load_balance_coeff the first step)."""
    config = base_config(world, tmp_path / "run", [{"name": "s", "data": str(world / "text.jsonl"), "steps": 1,
                                                    "batch_size": 2, "lr": {"decoder": 1e-3}}])
    config["model"]["decoder"].update(rope_theta="5e5", load_balance_coeff="1e-3")
    config["model"]["video"] = {"num_frames": "2"}
    model = fusion.stage_setup.build_model(fusion.trainer.TrainConfig.from_dict(config))
    assert model.config.decoder.rope_theta == 500000.0 and model.config.decoder.load_balance_coeff == 0.001
    assert model.config.video.num_frames == 2
    train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
    config["model"]["decoder"]["rope_theta"] = "large"
    config["output_dir"] = str(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model.decoder.rope_theta must be a number, got the text 'large'"):
        fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(config))


def test_a_final_eval_that_cannot_read_its_data_fails_before_training(world, tmp_path):
    """`final_eval`'s root and the readability of its first samples are checked before training, as a stage's
    eval is (a wrong root failed after the whole run had trained, with no eval.json)."""
    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 1, "batch_size": 2, "lr": {"decoder": 1e-3}}]
    moved = tmp_path / "elsewhere" / "val.jsonl"  # its media paths are relative to the world folder
    moved.parent.mkdir()
    moved.write_text((world / "val.jsonl").read_text())
    for final, message in (({"data": str(world / "val.jsonl"), "root": str(tmp_path / "nowhere")},
                            r"final_eval: media root .*nowhere' is not a folder"),
                           ({"data": str(moved)}, r"final_eval: none of 4 samples of its eval data .*elsewhere.*\(the first 4\) can")):
        config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, final_eval=final))
        for run in (fusion.trainer.check, lambda c: train(c, progress=False)):
            with pytest.raises(ConfigError, match=message):
                run(config)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unreadable_eval_data_fails_before_training(world, tmp_path):
    bad = tmp_path / "elsewhere" / "val.jsonl"  # the media paths inside are relative to the world folder
    bad.parent.mkdir()
    bad.write_text((world / "val.jsonl").read_text())
    stages = [{"name": "s", "data": str(world / "train.jsonl"), "steps": 50, "batch_size": 4,
               "lr": {"adapter": 1e-3}, "eval": {"data": str(bad)}}]
    with pytest.raises(fusion.errors.ConfigError, match="eval data .* can be read"):
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages)), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or losses(tmp_path / "run") == []


def test_a_root_reads_a_files_media_from_another_folder(world, tmp_path):
    """A data entry's, an eval's and the final evaluation's `root`: the folder the file's media paths are
    relative to (as LLaVA files point into an image folder elsewhere); a root that is no folder stops the run
    before training."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (elsewhere / name).write_text((world / name).read_text())
    stages = [{"name": "s", "data": [{"path": str(elsewhere / "train.jsonl"), "root": str(world)}], "steps": 2,
               "batch_size": 4, "lr": {"adapter": 1e-3},
               "eval": {"data": str(elsewhere / "val.jsonl"), "root": str(world), "limit": 2}}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages, final_eval={
        "data": str(elsewhere / "val.jsonl"), "root": str(world), "limit": 2}))
    train(config, progress=False)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sum(e["skipped_samples"] for e in logged if e["kind"] == "train") == 0
    assert [e["accuracy"] != {} for e in logged if e["kind"] == "eval"] == [True]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["counts"]["evaluated"] == 2

    stages[0]["data"][0]["root"] = str(tmp_path / "images")  # not there
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run2", stages))
    with pytest.raises(fusion.errors.ConfigError, match=r"stage 's': media root .*images' is not a folder"):
        train(config, progress=False)


def test_a_model_setting_the_model_cannot_take_is_a_config_error(world, tmp_path, capsys):
    stages = [{"name": "s", "data": str(world / "text.jsonl"), "steps": 1, "batch_size": 2, "lr": {"decoder": 1e-3}}]
    config = base_config(world, tmp_path / "run", stages)
    config["model"]["decoder"]["hidden_sise"] = 32
    path = write_config(tmp_path / "run.yaml", config)
    assert fusion_cli_main(["train", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fusion train: ConfigError: model: ") and "hidden_sise" in err and "Traceback" not in err


@pytest.mark.parametrize("mistake", ["data", "eval", "init_from", "final_eval", "unreadable eval"])
def test_a_later_stage_naming_a_missing_file_fails_before_training(world, tmp_path, mistake):
    """A mistake in the second stage (or the final evaluation) stops the run before the first stage trains,
    with a message naming the stage and the path, not once the first stage is done."""
    first = {"name": "first", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 2, "lr": {"adapter": 1e-3}}
    second = {**first, "name": "second"}
    extra = {}
    bad = tmp_path / "elsewhere" / "val.jsonl"
    if mistake == "data":
        second["data"] = [str(world / "train.jsonl"), "train_extra.jsonl"]
    elif mistake == "eval":
        second["eval"] = {"data": str(bad)}
    elif mistake == "init_from":
        second["init_from"] = "runs/first/final"
    elif mistake == "final_eval":
        extra["final_eval"] = {"data": str(bad)}
    else:  # the file is there, but the media paths in it are relative to the world folder
        bad.parent.mkdir()
        bad.write_text((world / "val.jsonl").read_text())
        second["eval"] = {"data": str(bad)}
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [first, second], **extra))
    config.base_dir = str(tmp_path)
    expected = {"data": r"stage 'second': data file .*train_extra.jsonl' does not exist",
                "eval": r"stage 'second': data file .*elsewhere/val.jsonl' does not exist",
                "init_from": r"stage 'second': init_from: model folder .*runs/first/final' does not exist",
                "final_eval": r"final_eval: data file .*elsewhere/val.jsonl' does not exist",
                "unreadable eval": r"stage 'second': none of .* eval data .*elsewhere/val.jsonl' .*can be read"}
    with pytest.raises(fusion.errors.ConfigError, match=expected[mistake]):
        fusion.trainer.check(config)  # `fusion train --check` finds it too
    with pytest.raises(fusion.errors.ConfigError, match=expected[mistake]):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or losses(tmp_path / "run") == []


def test_check_describes_each_stage_and_writes_nothing(world, tmp_path):
    """`fusion train CONFIG --check`: each stage's samples, steps, epochs and trained parts, and no folder,
    log or model written."""
    from fusion.data.datasets import ConversationDataset

    stages = [{"name": "cotrain", "data": str(world / "train.jsonl"), "group_by_media": True, "steps": 30,
               "batch_size": 4, "lr": {"vision": 1e-3, "adapter": 1e-3}, "eval": {"data": str(world / "val.jsonl")}},
              {"name": "all", "data": [str(world / "train.jsonl"), str(world / "text.jsonl")], "epochs": 2,
               "batch_size": 8, "compile": False, "lr": {"vision": 1e-4, "adapter": 1e-3, "decoder": 1e-3}}]
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", base_config(world, out, stages, final_eval={"data": str(world / "test.jsonl")}))
    checked = _run_cli(["train", str(config), "--check"], text=True)
    output, _ = checked.communicate(timeout=300)
    assert checked.returncode == 0, output
    model = build_model(fusion.trainer.TrainConfig.from_dict(base_config(world, out, stages)))
    grouped = len(ConversationDataset(world / "train.jsonl", model.processor, group_by_media=True))
    every = len(ConversationDataset(world / "train.jsonl", model.processor)) + len(
        ConversationDataset(world / "text.jsonl", model.processor))
    assert (f"stage 'cotrain': 30 steps of 4 samples = {30 * 4 / grouped:.2f} epochs of its {grouped}; "
            f"trains vision, adapter (decoder frozen); evaluates on {world / 'val.jsonl'}") in output
    steps = 2 * (every // 8)  # two passes of full batches
    assert (f"stage 'all': {steps} steps of 8 samples = 2.00 epochs of its {every}; "
            f"trains vision, adapter, decoder") in output
    assert f"final_eval: {world / 'test.jsonl'}" in output and "nothing was trained or written" in output
    assert not out.exists()


def test_check_with_resume_says_where_the_run_goes_on_and_what_the_changed_config_does(world, tmp_path,
                                                                                        monkeypatch):
    """`fusion train CONFIG --resume --check`: the stage the run resumes in, from which step, and the stages
    after it; for a run whose every stage had finished, that nothing is trained; and, as the run says it, what
    changes to the run's config do (those to finished stages change nothing)."""
    from fusion.errors import TrainingStopped

    def stages(steps):
        return [{"name": name, "data": str(world / "train.jsonl"), "steps": steps, "batch_size": 4,
                 "lr": {"adapter": 1e-3}} for name in ("first", "second")]

    def config(steps):
        return fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages(steps)))

    ctrl_c_at_step(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        train(config(3), progress=False)
    described = fusion.trainer.check(config(3), resume=True)
    lines = described.splitlines()
    assert re.fullmatch(r"stage 'first': 3 steps of 4 samples = .*; resumes after its step 2; trains adapter .*",
                        lines[-2]), described
    assert re.fullmatch(r"stage 'second': 3 steps of 4 samples = .*; trains adapter .*", lines[-1]), described
    monkeypatch.undo()
    train(config(3), resume=True, progress=False)  # to its end
    with pytest.warns(fusion.trainer.TrainingWarning, match=r"concern stages the run has finished.*change nothing"):
        described = fusion.trainer.check(config(5), resume=True)
    assert "stage '" not in described
    assert ("stages: every stage had finished at the checkpoint (run step 6): nothing is trained; the final model "
            "is written and evaluated again (to train longer, add a stage") in described


def test_check_before_the_shapes_world_exists_describes_what_it_can(world, tmp_path):
    """With a shapes world still to be generated (and a tokenizer to be trained on it), `check` says so and
    describes the stages by their steps, generating nothing."""
    pending = tmp_path / "world"
    stages = [{"name": "s", "data": str(pending / "train.jsonl"), "steps": 5, "batch_size": 2, "lr": {"adapter": 1e-3}}]
    settings = base_config(world, tmp_path / "run", stages, data={"shapes_world": {"out_dir": str(pending)}})
    settings["model"]["tokenizer"]["train_on"] = [str(pending / "text.jsonl")]
    described = fusion.trainer.check(fusion.trainer.TrainConfig.from_dict(settings))
    assert "(generated by the first run)" in described and "model: built from scratch once the shapes world exists" in described
    assert "stage 's': 5 steps of 2 samples; trains adapter (vision, decoder frozen)" in described
    assert not pending.exists() and not (tmp_path / "run").exists()


def test_a_stage_may_start_from_an_earlier_stages_model_of_the_same_run(world, tmp_path):
    """`init_from` naming a model the run itself writes (an earlier stage's, in output_dir/stages/) is not
    refused before training for being missing then."""
    first = {"name": "first", "data": str(world / "train.jsonl"), "steps": 2, "batch_size": 2, "lr": {"adapter": 1e-3}}
    stages = [first, {**first, "name": "second"},  # "again" trains the tower only: its adapter is the one it loaded
              {**first, "name": "again", "init_from": str(tmp_path / "run" / "stages" / "first"),
               "lr": {"vision": 1e-3}}]
    final = train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", stages)), progress=False)
    logged = [e["stage"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "train"]
    assert logged == ["first"] * 2 + ["second"] * 2 + ["again"] * 2
    weights = {name: load_file(tmp_path / "run" / "stages" / name / "model.safetensors") for name in ("first", "second")}
    again = load_file(final / "model.safetensors")
    adapter = [name for name in again if name.startswith("adapter.")]
    assert all(torch.equal(again[name], weights["first"][name]) for name in adapter)  # first's weights, not second's
    assert not all(torch.equal(again[name], weights["second"][name]) for name in adapter)


def test_length_buckets_and_row_splits_pad_less_and_train_the_same(world, tmp_path, monkeypatch):
    """Splitting each batch into groups of similar length (short image samples apart from long video ones)
    changes only the padding, and so does computing a long grouped sample as several rows
    (`max_row_tokens`): the logged losses equal those of one padded batch."""
    stages = [{"name": "all", "data": [str(world / "train.jsonl"), str(world / "text.jsonl")], "steps": 4,
               "batch_size": 8, "group_by_media": True, "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}]
    real_split = fusion.data.collate.split_branches
    splits = []
    monkeypatch.setattr(fusion.data.collate, "split_branches",
                        lambda *a: splits.append(len(rows := real_split(*a))) or rows)
    ways = {"one": {}, "buckets": {"length_buckets": 2}, "rows": {"length_buckets": 2, "max_row_tokens": 48}}
    runs = {}
    for name, settings in ways.items():
        config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / name, [{**stages[0], **settings}],
                                                                  threads=1))
        train(config, progress=False)
        runs[name] = [e for e in read_metrics(tmp_path / name / "metrics.jsonl") if e["kind"] == "train"]
    assert max(splits) > 1  # some samples were computed as several rows
    for name in ("buckets", "rows"):
        for one, other in zip(runs["one"], runs[name], strict=True):
            assert other["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5), (name, one["step"])
    padded = lambda run: sum(e["padded_tokens"] for e in run)  # noqa: E731
    assert padded(runs["buckets"]) < padded(runs["one"])
    with pytest.raises(fusion.errors.ConfigError, match="stage 'all': max_row_tokens must be >= 1"):
        fusion.trainer.TrainConfig.from_dict({"stages": [{**stages[0], "max_row_tokens": 0}]})


def test_cached_samples_train_the_same(world, tmp_path, monkeypatch):
    """`cache_samples: true` keeps processed samples and decoded media in memory for the run: after the
    first stage's epoch nothing is decoded again, in that stage or the next, and the losses are exactly
    the uncached run's."""
    stage = {"data": [str(world / "train.jsonl")], "epochs": 1, "batch_size": 4, "group_by_media": True,
             "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}
    decoded = []
    real = fusion.processor.FusionProcessor.process_media
    monkeypatch.setattr(fusion.processor.FusionProcessor, "process_media",
                        lambda self, *a, **k: decoded.append(a) or real(self, *a, **k))
    runs, reads = {}, {}
    for cache in (False, True):
        decoded.clear()
        stages = [{**stage, "name": name, "cache_samples": cache} for name in ("first", "second")]
        config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / str(cache), stages, threads=1))
        train(config, progress=False)
        runs[cache], reads[cache] = losses(tmp_path / str(cache)), len(decoded)
    samples = 24 + 4  # the world's training images and videos, one grouped sample each
    assert len(runs[True]) == 2 * samples // 4 and runs[True] == runs[False]
    # (uncached, each stage's first sample is read once more, by the check before the run, which stops at the
    # first readable one; cached, that check's read is kept for the stage)
    assert reads == {False: 2 * samples + 2 * 1, True: samples}


@needs_cpu_compiler
def test_a_compiled_stage_trains_like_an_eager_one(world, tmp_path, monkeypatch):
    """`compile: true` runs the stage's steps through torch.compile'd decoder blocks: the losses are the eager
    run's (float32, within float tolerance), evaluation in the middle of it still works (it runs eagerly), and
    the stage after it runs eagerly again."""
    import torch._dynamo

    # A private inductor cache: entries written under pytest can name this conftest, and a later process that
    # loads one imports it (which sets torch's thread count mid-trace, an error for dynamo).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    stage = {"data": [str(world / "train.jsonl")], "steps": 3, "batch_size": 8, "group_by_media": True,
             "length_buckets": 2, "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3}}
    runs = {}
    for compiled in (False, True):
        stages = [{**stage, "name": "eager"},
                  {**stage, "name": "compiled", "compile": compiled,
                   "eval": {"data": str(world / "val.jsonl"), "every": 2, "limit": 4}},
                  {**stage, "name": "after"}]
        config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / str(compiled), stages,
                                                                  threads=1, precision="fp32"))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        train(config, progress=False)
        runs[compiled] = losses(tmp_path / str(compiled))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, graphs
    assert len(runs[True]) == 9
    for (step, eager_loss), (_, compiled_loss) in zip(runs[False], runs[True], strict=True):
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-4, abs=1e-5), step
    evals = [e for e in read_metrics(tmp_path / "True" / "metrics.jsonl") if e["kind"] == "eval"]
    assert [e["stage"] for e in evals] == ["compiled", "compiled"] and all(e["accuracy"] for e in evals)


def test_a_cxx_with_arguments_is_looked_up_by_its_command(monkeypatch):
    """inductor runs $CXX split into words (`ccache g++`, `g++ -fdiagnostics-color`): the check looks up the
    command, not the whole string."""
    monkeypatch.setattr(fusion.compilation.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "ccache" else None)
    monkeypatch.setenv("CXX", "ccache g++ -O2")
    assert fusion.compilation.cpu_compiler() == "/usr/bin/ccache"
    monkeypatch.setenv("CXX", "no-such-cc -O2")
    assert fusion.compilation.cpu_compiler() is None


def test_compile_without_a_cpu_compiler_fails_before_training(world, tmp_path, monkeypatch):
    monkeypatch.setattr(fusion.compilation.shutil, "which", lambda name: None)
    stages = [{"name": "fast", "data": [str(world / "train.jsonl")], "steps": 1, "batch_size": 2,
               "lr": {"decoder": 1e-3}, "compile": True}]
    config = fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path, stages, device="cpu"))
    with pytest.raises(fusion.errors.ConfigError, match="stage 'fast': compile: true on a CPU needs a C.. compiler"):
        train(config, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def uneven_data(world, tmp_path_factory):
    """`world`'s train.jsonl with every fifth image missing, and the first 8 samples of its text.jsonl."""
    folder = tmp_path_factory.mktemp("uneven")
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    for record in records:
        record["images"] = [str(world / p) for p in record["images"]]
        record["videos"] = [str(world / p) for p in record["videos"]]
    for i in range(0, len(records), 5):  # every fifth image is missing: that sample is skipped
        if records[i]["images"]:
            records[i]["images"] = [str(folder / "missing.png")]
    mixed = folder / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records))
    few_text = folder / "few_text.jsonl"
    few_text.write_text("".join((world / "text.jsonl").read_text().splitlines(keepends=True)[:8]))
    return mixed, few_text


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_uneven_batches_on_two_processes_match_one_process(world, tmp_path, strategy, uneven_data, one_process_run):
    """A process's batch may hold text only (no image for the vision tower), fewer micro-batches than the
    other's (a bad sample dropped from its length buckets), or nothing at all of a small validation file.
    Under FSDP2 every process must still run the sharded modules as often as the others (or they wait for
    each other forever). The run gives the losses and validation loss of one process."""
    # a second stage: one sample per process and step, so a bad sample leaves a process nothing to train on;
    # the decoder frozen while the tower trains, and text-only samples (no media for the tower in a batch)
    mixed, few_text = uneven_data
    stage = {"name": "mixed", "data": [str(mixed), str(world / "text.jsonl")], "steps": 6, "batch_size": 4,
             "length_buckets": 2, "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3},
             "eval": {"data": str(world / "val.jsonl"), "limit": 2, "loss_batches": 20}}  # past the file's end
    shares = {"name": "shares", "data": [str(mixed), str(few_text)], "steps": 8, "batch_size": 2,
              "lr": {"vision": 1e-3, "adapter": 1e-3}}
    settings = {"threads": 1, "precision": "fp32"}
    one = one_process_run("uneven", base_config(world, None, [stage, shares], **settings))
    two = write_config(tmp_path / "two.yaml", base_config(world, tmp_path / "two", [stage, shares],
                                                          distributed={"strategy": strategy}, **settings))
    train_two_processes(two)
    runs = [read_metrics(folder / "metrics.jsonl") for folder in (one, tmp_path / "two")]
    train_logs = [[e for e in run if e["kind"] == "train"] for run in runs]
    assert sum(e["skipped_samples"] for e in train_logs[1]) > 0  # some bad samples were drawn
    assert any(e["skipped_samples"] for e in train_logs[1] if e["stage"] == "shares")  # a process had none
    for a, b in zip(*train_logs, strict=True):  # other groupings round differently, and Adam amplifies that a
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), f"step {a['step']}"  # little (1e-4 at step 5)
        assert b["skipped_samples"] == a["skipped_samples"]
    evals = [[e for e in run if e["kind"] == "eval"] for run in runs]
    assert evals[1][0]["val_loss"] == pytest.approx(evals[0][0]["val_loss"], rel=1e-4)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()


@needs_cpu_compiler
def test_fsdp2_with_compiled_stages_matches_one_eager_process(world, tmp_path, torchrun_inductor_cache,
                                                              without_inductor_kernels):
    """`compile: true` under torchrun with FSDP2 (each block compiled, then sharded; `without_inductor_kernels`):
    an eager stage against the frozen trunk, then a compiled one with everything unfrozen and an evaluation (run
    eagerly), checkpoints in both, give the losses and validation figures of an eager 1-process run (float32),
    and the final model loads in one process."""
    stages = [{"name": "cotrain", "data": str(world / "train.jsonl"), "steps": 3, "batch_size": 8,
               "lr": {"vision": 1e-3, "adapter": 1e-3}},
              {"name": "unfreeze", "data": str(world / "train.jsonl"), "steps": 3, "batch_size": 8,
               "lr": {"vision": 1e-3, "adapter": 1e-3, "decoder": 1e-3},
               "eval": {"data": str(world / "val.jsonl"), "limit": 4}}]
    settings = {"threads": 1, "precision": "fp32", "checkpoint_every": 2}
    one = write_config(tmp_path / "one.yaml", base_config(world, tmp_path / "one", stages, **settings))
    two = write_config(tmp_path / "two.yaml", base_config(world, tmp_path / "two", [stages[0], {**stages[1], "compile": True}],
                                                          distributed={"strategy": "fsdp2"}, **settings))
    train_one_and_two_processes(one, two, torchrun_inductor_cache, timeout=400)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [step for step, _ in a] == [step for step, _ in b] == list(range(1, 7))
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"step {step}: 1 eager process {x}, 2 compiled FSDP2 {y}"
    evals = [[e for e in read_metrics(tmp_path / out / "metrics.jsonl") if e["kind"] == "eval"] for out in ("one", "two")]
    assert len(evals[0]) == len(evals[1]) == 1
    assert evals[1][0]["val_loss"] == pytest.approx(evals[0][0]["val_loss"], rel=1e-4)
    assert evals[1][0]["accuracy"] == evals[0][0]["accuracy"]
    # the weights (not the experts' balance bias: it counts padding, which differs with the split)
    assert_same_trained_weights(tmp_path / "two" / "final", tmp_path / "one" / "final", parameters_only=True)


def test_gradient_accumulation_gives_the_losses_and_weights_of_one_big_batch(world, tmp_path, monkeypatch):
    """`grad_accum: 2` computes each batch of 4 as two forwards of 2 samples, and the step is the one of the
    whole batch: the same logged losses and the same final weights as `grad_accum: 1`."""
    forwards = []  # the samples of each forward
    forward = fusion.training_step.TrainingStep.forward

    def counted(self, inputs, *args):
        forwards.append(inputs["input_ids"].shape[0])
        return forward(self, inputs, *args)

    monkeypatch.setattr(fusion.training_step.TrainingStep, "forward", counted)
    stage = {"name": "s", "data": str(world / "text.jsonl"), "steps": 3, "batch_size": 4, "lr": {"decoder": 1e-3}}
    runs, weights, calls = {}, {}, {}
    for accum in (1, 2):
        forwards.clear()
        out = tmp_path / f"accum{accum}"
        config = base_config(world, out, [{**stage, "grad_accum": accum}], threads=1, precision="fp32")
        train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
        runs[accum], calls[accum] = losses(out), list(forwards)
        weights[accum] = load_file(out / "final" / "model.safetensors")
    assert calls == {1: [4] * 3, 2: [2] * 6}  # one forward of 4 samples per step, or two of 2
    assert [step for step, _ in runs[2]] == [step for step, _ in runs[1]] == [1, 2, 3]
    for (step, one), (_, two) in zip(runs[1], runs[2]):
        assert two == pytest.approx(one, rel=1e-5), f"step {step}"
    assert weights[1].keys() == weights[2].keys()
    for name, tensor in weights[1].items():
        assert torch.allclose(weights[2][name], tensor, rtol=1e-4, atol=1e-6), name


def test_clip_grad_norm_caps_the_gradient_norm_of_each_step(world, tmp_path, monkeypatch):
    """A stage's `clip_grad_norm` scales every step's gradients down to that norm before the optimizer
    step (here far below the unclipped norm); `clip_grad_norm: null` leaves them as computed."""
    norms = []  # (norm before clipping, norm the optimizer then sees) per step
    clip = torch.nn.utils.clip_grad_norm_

    def observed(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters
                                                      if p.grad is not None]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", observed)
    stage = {"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}
    seen = {}
    for name, limit in (("clipped", 1e-3), ("unclipped", None)):
        norms.clear()
        config = base_config(world, tmp_path / name, [{**stage, "clip_grad_norm": limit}], threads=1)
        train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
        seen[name] = list(norms)
    assert len(seen["clipped"]) == len(seen["unclipped"]) == 2
    for before, after in seen["clipped"]:
        assert before > 0.1 and after == pytest.approx(1e-3, rel=1e-3)
    for before, after in seen["unclipped"]:
        assert before > 0.1 and after == pytest.approx(before, rel=1e-5)


def test_moe_count_padding_reaches_every_moe_layer_while_training(world, tmp_path, monkeypatch):
    """`moe_count_padding: true` (the shipped model's recipe) makes every MoE layer count padded tokens for
    its balance in every training forward; left out, they count real tokens only."""
    seen = []
    forward = fusion.moe.MoE.forward
    monkeypatch.setattr(fusion.moe.MoE, "forward",
                        lambda self, *a, **k: seen.append((self.training, self.count_padding)) or
                        forward(self, *a, **k))
    stage = {"name": "s", "data": str(world / "text.jsonl"), "steps": 2, "batch_size": 4, "lr": {"decoder": 1e-3}}
    for name, extra, expected in (("counted", {"moe_count_padding": True}, True), ("default", {}, False)):
        seen.clear()
        config = base_config(world, tmp_path / name, [stage], threads=1, **extra)
        train(fusion.trainer.TrainConfig.from_dict(config), progress=False)
        in_training = [count for training, count in seen if training]
        assert len(in_training) == 2 * 2  # two MoE layers, two steps
        assert in_training == [expected] * 4, name


def test_a_stages_learning_rate_warms_up_then_follows_the_cosine_to_its_floor(world, tmp_path):
    """4 steps, `warmup_steps: 2`, `min_lr_ratio: 0.1`, rate 1e-3: the steps train at 0.5e-3, 1e-3 (linear
    warmup), then the cosine from 1e-3: 1e-3 and 0.55e-3; the floor 1e-4 is reached after the last step. The
    metrics log shows the rate each step trained at (it showed the next step's)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    used = []  # each optimizer step's rates, as it steps
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used.append({g["part"]: g["lr"] for g in optimizer.param_groups}))
    stage = {"name": "s", "data": str(world / "text.jsonl"), "steps": 4, "batch_size": 2, "warmup_steps": 2,
             "min_lr_ratio": 0.1, "lr": {"decoder": 1e-3}}
    try:
        train(fusion.trainer.TrainConfig.from_dict(base_config(world, tmp_path / "run", [stage], threads=1)),
              progress=False)
    finally:
        hook.remove()
    assert [rates["decoder"] for rates in used] == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4])
    logged = [e["lr"]["decoder"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "train"]
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4])
