"""A training config with a mistake stops before anything runs, with a message that names the stage, the
key and what to write instead; `fusion train` prints it as one line (no traceback) and exits with 1."""
import pytest

from fusion.cli import main as fusion_cli
from fusion.errors import ConfigError
from fusion.train_config import load_train_config

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
    (["lr: {decoder: 1.0e-3}", "epochs: 0"], r"stage 'cotrain': epochs must be > 0"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "group_by_media: sometimes"],
     r"stage 'cotrain': group_by_media must be true or false, got 'sometimes'"),
    (["lr: {decoder: 1.0e-3}", "steps: 10", "eval: {data: val.jsonl, evry: 50}"],
     r"stage 'cotrain': eval: unknown key 'evry' \(did you mean 'every'\?\)"),
    (["steps: 10"], r"stage 'cotrain': missing lr"),
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


def test_fusion_train_prints_a_config_mistake_as_one_line_and_exits_with_1(tmp_path, capsys):
    path = stage_with(tmp_path, "lr: {decoder: 1.0e-3}", "step: 10")
    assert fusion_cli(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fusion train: ConfigError: stage 'cotrain': unknown key 'step' (did you mean 'steps'?)")
    assert "Traceback" not in err and err.count("\n") == 1
