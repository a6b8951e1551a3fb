"""A training config with a mistake stops before anything runs, with a message that names the stage, the
key and what to write instead; `fusion train` prints it as one line (no traceback) and exits with 1."""
import math

import pytest

from fusion.cli import main as fusion_cli
from fusion.errors import ConfigError
from fusion.train_config import StageConfig, load_train_config

STAGE = """\
stages:
  - name: cotrain
    data: train.jsonl
    {line}
"""


def config_file(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def stage_with(tmp_path, *lines: str):
    """A one-stage config whose stage has `lines` (YAML, without indentation) besides its name and data."""
    return config_file(tmp_path, STAGE.format(line="\n    ".join(lines)))


def test_rates_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as the text '1e-3'; a config means the number."""
    config = load_train_config(stage_with(tmp_path, "lr: {vision: 1e-3, decoder: 0}", "steps: 10",
                                          "min_lr_ratio: 5e-2"))
    stage = config.stages[0]
    assert stage.lr == {"vision": 0.001, "decoder": 0.0} and stage.rate("vision") == 0.001
    assert stage.min_lr_ratio == 0.05


@pytest.mark.parametrize("lines, message", [
    (["lr: {decoder: 1.0e-3}", "step: 10"], r"stage 'cotrain': unknown key 'step' \(did you mean 'steps'\?\)"),
    (["lr: {decoder: fast}", "steps: 10"], r"stage 'cotrain': lr of 'decoder' must be a number, got the text 'fast'"),
    (["lr: 1.0e-3", "steps: 10"], r"stage 'cotrain': lr must map parts to rates"),
    (["lr: {decoder: 1.0e-3}", "steps: 2.5"], r"stage 'cotrain': steps must be a whole number, got 2.5"),
    (["lr: {decoder: 1.0e-3}", "steps: 0"], r"stage 'cotrain': steps must be >= 1, got 0"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "batch_size: 0"], r"stage 'cotrain': batch_size must be >= 1"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "pack: true", "max_length: 0"], r"stage 'cotrain': max_length must be >= 1"),
    (["lr: {decoder: 1.0e-3}", "epochs: 0"], r"stage 'cotrain': epochs must be > 0"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "group_by_media: sometimes"],
     r"stage 'cotrain': group_by_media must be true or false, got 'sometimes'"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "eval: {data: val.jsonl, evry: 50}"],
     r"stage 'cotrain': eval: unknown key 'evry' \(did you mean 'every'\?\)"),
    (["steps: 10"], r"stage 'cotrain': missing lr"),
    # numbers that would make training climb the loss, or never reach its rate
    (["lr: {decoder: 1.0e-3}", "steps: 10", "clip_grad_norm: -1"], r"clip_grad_norm must be > 0 \(or null"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "min_lr_ratio: -3"], r"min_lr_ratio .* must be in \[0, 1\], got -3"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "weight_decay: -0.1"], r"weight_decay must be >= 0, got -0.1"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "warmup_steps: 100"],
     r"warmup_steps \(100\) must be at most the stage's steps \(10\)"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "eval: {data: val.jsonl, loss_batches: 0}"],
     r"eval loss_batches must be >= 1, got 0"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "eval: {every: 5}"], r"eval every 5 steps needs eval data"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "eval: [val.jsonl]"], r"eval must be a dataset file or a mapping"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "init_from: ''"], r"init_from must name a model folder"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "data: [{path: train.jsonl, root: ''}]"],
     r"root of train.jsonl must be a folder path"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "pack: true", "length_buckets: 2"],
     r"stage 'cotrain': pack: true puts samples into rows .* leave length_buckets out"),
])
def test_a_mistake_in_a_stage_is_named(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(stage_with(tmp_path, *lines))


def test_a_mistake_at_the_top_level_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"training config: unknown key 'stage' \(did you mean 'stages'\?\)"):
        load_train_config(config_file(tmp_path, "stage: []\n"))
    with pytest.raises(ConfigError, match="training config: no stages"):
        load_train_config(config_file(tmp_path, "name: run\n"))
    with pytest.raises(ConfigError, match="training config: seed must be a whole number"):
        load_train_config(config_file(tmp_path, "seed: 0.5\n" + STAGE.format(line="lr: {decoder: 1.0e-3}\n"
                                                                                 "    steps: 1")))


ONE_STAGE = STAGE.format(line="lr: {decoder: 1.0e-3}\n    steps: 1")


@pytest.mark.parametrize("top, message", [
    ("log_every: 0", r"training config: log_every must be >= 1, got 0"),
    ("keep_checkpoints: 0", r"training config: keep_checkpoints must be >= 1, got 0"),
    ("threads: -2", r"training config: threads must be >= 1, got -2"),
    ("model: default", r"training config: model must be a mapping, e.g. model: \{init_from: default\}"),
    ("distributed: fsdp2", r"training config: distributed must be a mapping, e.g. distributed: \{strategy: fsdp2\}"),
    ("distributed: {stratgy: fsdp2}", r"distributed: unknown key 'stratgy' \(did you mean 'strategy'\?\)"),
    ("distributed: {strategy: fsdp2, gather_for_eval: yes please}",
     r"distributed.gather_for_eval must be true or false, got 'yes please'"),
    ("data: {train: train.jsonl}", r"data: unknown keys \['train'\]; the only one is shapes_world"),
    ("data: {shapes_world: {train_images: 24}}", r"data.shapes_world must be a mapping with out_dir"),
    ("data: {shapes_world: {out_dir: w, train_image: 24}}",
     r"data.shapes_world: unknown key 'train_image' \(did you mean 'train_images'\?\)"),
    ("final_eval: {limit: 2}", r"final_eval must be a dataset file or a mapping like \{data: test.jsonl"),
    ("final_eval: {data: test.jsonl, limt: 2}", r"final_eval: unknown key 'limt' \(did you mean 'limit'\?\)"),
    ("final_eval: {data: test.jsonl, batch_size: 0}", r"final_eval: batch_size must be >= 1, got 0"),
    ("device: gpu", r"training config: device: unknown device 'gpu'; use cpu, cuda or cuda:N"),
])
def test_a_mistake_in_a_top_level_setting_is_named_before_anything_runs(tmp_path, top, message):
    """Settings that used to pass and then crash mid-run (log_every: 0, a final_eval without data), be ignored
    (a typo'd key of distributed, final_eval or the shapes world), or fail with a traceback (model: default)."""
    with pytest.raises(ConfigError, match=message):
        load_train_config(config_file(tmp_path, top + "\n" + ONE_STAGE))


def test_gather_for_eval_on_a_torch_without_it_says_what_to_do(tmp_path, monkeypatch):
    """Holding every FSDP2 module gathered needs `FSDPModule.set_reshard_after_forward` (torch 2.7): on an
    older torch the config is refused before anything runs, not an evaluation's AttributeError mid-run. Under
    DDP the option changes nothing and needs nothing."""
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "set_reshard_after_forward")
    with pytest.raises(ConfigError, match=r"distributed.gather_for_eval needs torch 2.7 or later .*leave the option "
                                          r"out \(the evaluation then runs sharded\)"):
        load_train_config(config_file(tmp_path, "distributed: {strategy: fsdp2, gather_for_eval: true}\n" + ONE_STAGE))
    config = load_train_config(config_file(tmp_path, "distributed: {strategy: ddp, gather_for_eval: true}\n"
                                           + ONE_STAGE))
    assert config.distributed == {"strategy": "ddp", "gather_for_eval": True}


@pytest.mark.parametrize("name", ["1", "../elsewhere", "''", "a/b", "'..'"])
def test_a_stage_name_must_name_a_folder_inside_the_run(tmp_path, name):
    """A stage's model is saved in stages/NAME: a number crashed after the stage trained, and `../x` wrote it
    outside output_dir (where --overwrite never removes it)."""
    text = STAGE.replace("name: cotrain", f"name: {name}").format(line="lr: {decoder: 1.0e-3}\n    steps: 1")
    with pytest.raises(ConfigError, match=r"a stage's name names its folder in the run"):
        load_train_config(config_file(tmp_path, text))


def test_a_final_eval_batch_size_of_null_is_the_default(tmp_path):
    config = load_train_config(config_file(tmp_path, "final_eval: {data: test.jsonl, batch_size: null}\n" + ONE_STAGE))
    assert config.final_eval == {"data": "test.jsonl"}  # the trainer's default (32), not None (a crash after training)


def test_a_dataset_file_alone_stands_for_eval_and_final_eval(tmp_path):
    config = load_train_config(config_file(tmp_path, "final_eval: test.jsonl\n" + STAGE.format(
        line="lr: {decoder: 1.0e-3}\n    steps: 1\n    eval: val.jsonl")))
    assert config.final_eval == {"data": "test.jsonl"} and config.stages[0].eval.data == "val.jsonl"


def test_fusion_train_prints_a_config_mistake_as_one_line_and_exits_with_1(tmp_path, capsys):
    path = stage_with(tmp_path, "lr: {decoder: 1.0e-3}", "step: 10")
    assert fusion_cli(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fusion train: ConfigError: stage 'cotrain': unknown key 'step' (did you mean 'steps'?)")
    assert "Traceback" not in err and err.count("\n") == 1


def test_set_changes_one_setting_by_its_dotted_path(tmp_path):
    """`fusion train CONFIG --set KEY=VALUE`: a variant of a config without editing it; stages are reached by
    name or index, values are YAML, missing mappings are made, and the config's own checks still apply."""
    path = config_file(tmp_path, "final_eval: test.jsonl\nmodel: {decoder: {hidden_size: 64}}\n" + STAGE.format(
        line="lr: {decoder: 1.0e-3}\n    steps: 10\n    eval: val.jsonl"))
    config = load_train_config(path, ["stages.cotrain.steps=20", "stages.0.lr.vision=1e-4", "model.decoder.hidden_size=32",
                                      "model.vision.width=16", "final_eval.limit=5", "stages.cotrain.eval.limit=7",
                                      "output_dir=elsewhere", "seed=3"])
    stage = config.stages[0]
    assert stage.steps == 20 and stage.lr == {"decoder": 1e-3, "vision": 1e-4} and stage.eval.limit == 7
    assert config.model == {"decoder": {"hidden_size": 32}, "vision": {"width": 16}}
    assert config.final_eval == {"data": "test.jsonl", "limit": 5}
    assert config.output_dir == "elsewhere" and config.seed == 3
    for override, message in (("stages.cotrian.steps=2", r"'cotrian' is neither an index nor one of its names "
                                                          r"\['cotrain'\]"),
                              ("stages.3.steps=2", r"stages is a list of 1; '3' is neither"),
                              ("seed", r"--set seed: give KEY=VALUE"),
                              ("seed.x=1", r"--set seed.x=1: seed is 0, which has no key 'x'"),
                              ("stages.cotrain.step=2", r"stage 'cotrain': unknown key 'step' \(did you mean 'steps'")):
        if override.startswith("seed."):
            path.write_text("seed: 0\n" + path.read_text())
        with pytest.raises(ConfigError, match=message):
            load_train_config(path, [override])


def test_set_changes_only_the_place_it_names_where_yaml_anchors_share_a_value(tmp_path):
    path = config_file(tmp_path, """\
stages:
  - {name: cotrain, data: train.jsonl, steps: 10, lr: &rates {vision: 1.0e-3}, eval: &val {data: val.jsonl, limit: 300}}
  - {name: unfreeze, data: train.jsonl, steps: 10, lr: *rates, eval: *val}
""")
    config = load_train_config(path, ["stages.cotrain.eval.limit=5", "stages.unfreeze.lr.decoder=3e-4"])
    cotrain, unfreeze = config.stages
    assert (cotrain.eval.limit, unfreeze.eval.limit) == (5, 300)
    assert cotrain.lr == {"vision": 1e-3} and unfreeze.lr == {"vision": 1e-3, "decoder": 3e-4}


def test_set_reaches_a_stage_whose_name_holds_dots(tmp_path):
    path = config_file(tmp_path, STAGE.replace("name: cotrain", "name: v1.2").format(line="lr: {decoder: 1.0e-3}\n"
                                                                                          "    steps: 10"))
    assert load_train_config(path, ["stages.v1.2.steps=4"]).stages[0].steps == 4


def test_fusion_train_set_reaches_the_run(tmp_path, capsys):
    path = config_file(tmp_path, STAGE.format(line="lr: {decoder: 1.0e-3}\n    steps: 10"))
    (tmp_path / "train.jsonl").write_text("")
    assert fusion_cli(["train", str(path), "--check", "--set", "stages.cotrain.step=3"]) == 1
    assert "stage 'cotrain': unknown key 'step'" in capsys.readouterr().err


@pytest.mark.parametrize("samples, batch_size, epochs, steps", [(10, 4, 1, 2), (10, 4, 2.5, 5), (8, 4, 1, 2),
                                                                (100, 1, 0.29, 29), (9, 4, 0.1, 1)])
def test_an_epoch_is_every_full_batch_of_one_pass_and_trains_no_sample_twice(samples, batch_size, epochs, steps):
    from fusion.data.stage_data import StageBatches
    from fusion.distributed import DistContext

    stage = StageConfig(name="s", data="d.jsonl", epochs=epochs, batch_size=batch_size, lr={"decoder": 1e-3})
    assert stage.total_steps(samples) == steps
    batches = iter(StageBatches(samples, batch_size, DistContext(0, 1), seed=1, stage_index=0))
    passes = [[i for _ in range(samples // batch_size) for i in next(batches)] for _ in range(math.ceil(epochs))]
    for one_pass in passes:
        assert len(set(one_pass)) == len(one_pass) == samples // batch_size * batch_size


def test_a_dataset_given_as_the_config_is_named_as_such(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": 1, "conversations": []}\n{"id": 2, "conversations": []}\n')
    with pytest.raises(ConfigError, match="(?s)not valid YAML.*looks like a dataset file: `fusion train` takes a YAML "
                                          "training config"):
        load_train_config(data)
