"""The README's "Fine-tuning on your own data" works as written: its dataset lines and its config (shortened to
a few steps) pass `fusion train --check`, fine-tune the shipped model with `fusion train`, and `fusion eval
default` measures the shipped one."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fusion
import fusion.trainer
import pipelines
from fusion.checkpoint import model_folder
from vision.video_io import write_video

ROOT = Path(__file__).resolve().parents[1]
SECTION = "### Fine-tuning on your own data"


def readme_blocks(kind: str) -> list[str]:
    """The ```kind code blocks of the README's fine-tuning section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n### ", len(SECTION))]
    return re.findall(rf"```{kind}\n(.*?)```", section, flags=re.S)


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fusion.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def readme_project(tmp_path):
    """A folder laid out as the README says: data/ with its three sample lines (and the image and clip they
    name) as train, val and test files, and finetune.yaml (its config, a few steps long) beside it."""
    [lines] = readme_blocks("jsonl")
    records = [json.loads(line) for line in lines.splitlines() if line.strip()]
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for record in records:
        for name in record.get("images", []):
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(data / name)
        for name in record.get("videos", []):
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            write_video(data / name, rng.integers(0, 255, (12, 48, 64, 3), dtype=np.uint8))
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text(lines)
    [config_text] = readme_blocks("yaml")
    config = {**yaml.safe_load(config_text), "log_every": 1}
    for stage in config["stages"]:
        stage.update(steps=2, batch_size=2)
        stage["eval"].update(limit=2)  # (every: 100 > steps: once, at the end of the stage)
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path, records


def test_the_readme_finetuning_example_trains_the_shipped_model_on_its_data(readme_project):
    project, records = readme_project
    assert {"images", "videos"} <= {key for r in records for key in r}  # an image, a video and a text sample
    assert any(not r.get("images") and not r.get("videos") for r in records)

    plan = fusion.trainer.check(project / "finetune.yaml")  # `fusion train finetune.yaml --check`
    assert "stage 'cotrain': 2 steps of 2 samples" in plan and not (project / "runs").exists()
    trained = cli("train", "finetune.yaml", "--no-progress", cwd=project)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = project / "runs" / "my-finetune"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["kind"] == "train"]
    assert [m["stage"] for m in steps] == ["cotrain"] * 2 + ["unfreeze"] * 2
    assert steps[0]["skipped_samples"] == 0  # the image, the clip and the text sample all read
    assert (run / "metrics.png").is_file() and (run / "eval.json").is_file()
    # init_from: default loads the shipped weights: the decoder, frozen in the first stage, is still exactly theirs
    from safetensors.torch import load_file
    shipped = load_file(model_folder("default") / "model.safetensors")
    cotrained = load_file(run / "stages" / "cotrain" / "model.safetensors")
    decoder = [name for name in shipped if name.startswith("decoder.")]
    assert decoder and all(torch.equal(cotrained[name], shipped[name]) for name in decoder)
    shipped = fusion.FusionModel.from_pretrained(model_folder("default"))
    tuned = fusion.FusionModel.from_pretrained(run / "final")
    assert tuned.config.to_dict() == shipped.config.to_dict()  # started from the shipped model
    assert tuned.tokenizer.vocab_size == shipped.tokenizer.vocab_size

    evaluated = cli("eval", "default", "data/test.jsonl", "--out", "shipped.json", "--no-progress", cwd=project)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((project / "shipped.json").read_text())
    assert results["model"] == "default" and results["counts"]["evaluated"] == len(records)


def test_default_names_the_shipped_model_and_anything_else_a_folder(tmp_path):
    assert model_folder("default") == Path(str(pipelines.default_model_location()))
    assert model_folder("./default", tmp_path) == tmp_path / "default"  # a folder called so
    assert model_folder("runs/final", tmp_path) == tmp_path / "runs" / "final"
    assert model_folder(tmp_path / "abs", "/elsewhere") == tmp_path / "abs"
