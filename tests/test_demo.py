"""examples/demo.py (`make demo`) on a stand-in model: every sample file and question is shown with an
answer, a score and a time; a model that cannot be loaded ends the demo with the pipeline's message."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory, load_example):
    settings = load_example("notebook_settings.py")
    return settings.build_stand_in_model(tmp_path_factory.mktemp("demo") / "stand-in")


def test_demo_shows_every_input_question_answer_score_and_time(stand_in):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--model", str(stand_in), "--threads", "1"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    manifest = json.loads((EXAMPLES / "media" / "media.json").read_text())
    items = manifest["images"] + manifest["videos"]
    questions = [q for item in items for q in item["questions"]]
    assert len(manifest["images"]) >= 3 and len(manifest["videos"]) >= 1
    for item in items:
        assert item["file"] in out
    for q in questions:
        assert f"Q: {q['question']}" in out
        assert f"true: {q['answer']!r}" in out
    answer_lines = [line for line in out.splitlines() if line.strip().startswith("A: ")]
    assert len(answer_lines) == len(questions)
    assert all("score 0." in line or "score 1." in line for line in answer_lines)
    assert all(line.rstrip().endswith(" ms") for line in answer_lines)
    assert out.count("caption: ") == len(manifest["images"])
    assert f"of {len(questions)} questions answered correctly" in out
    assert str(stand_in) in out.splitlines()[0]


def test_missing_models_end_the_demo_with_the_pipeline_message(monkeypatch, tmp_path, capsys, load_example):
    demo = load_example("demo.py")
    monkeypatch.setattr("pipelines.loading.default_model_location", lambda: tmp_path / "default_model")
    assert demo.main([]) == 1
    err = capsys.readouterr().err
    assert "default model is missing" in err and str(tmp_path / "default_model") in err
    assert demo.main(["--model", str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_a_device_torch_cannot_use_ends_the_demo_with_the_pipeline_message(monkeypatch, capsys, load_example):
    demo = load_example("demo.py")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert demo.main(["--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("demo: ") and "cuda" in err and "Traceback" not in err


def test_a_media_folder_without_a_usable_manifest_ends_the_demo_before_any_work(tmp_path, capsys, load_example):
    """--media on a folder with no media.json, an unreadable one, or one naming files that are not there: exit 1
    with a message naming the folder and the format's example, before the model loads."""
    demo = load_example("demo.py")
    assert demo.main(["--media", str(tmp_path), "--model", str(tmp_path / "no-model")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("demo: ") and f"--media {str(tmp_path)!r} has no media.json" in err
    assert str(EXAMPLES / "media" / "media.json") in err and "Traceback" not in err
    (tmp_path / "media.json").write_text('{"images": [{"caption": "x"}]}')
    assert demo.main(["--media", str(tmp_path)]) == 1
    assert "is not a media manifest (KeyError" in capsys.readouterr().err
    (tmp_path / "media.json").write_text('{"images": [{"file": "cat.png"}], "videos": []}')  # no caption, questions
    assert demo.main(["--media", str(tmp_path)]) == 1
    assert "is not a media manifest (KeyError: 'caption')" in capsys.readouterr().err
    (tmp_path / "media.json").write_text(json.dumps({"images": [{"file": "cat.png", "caption": "a cat", "questions": [
        {"question": "what?", "answer": "cat"}]}], "videos": []}))
    assert demo.main(["--media", str(tmp_path)]) == 1
    assert f"names files that are not in {str(tmp_path)!r}: cat.png" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--num-frames", "--threads"])
def test_counts_below_one_are_refused_by_the_command_line(option, capsys, load_example):
    demo = load_example("demo.py")
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args([option, "0"])
    assert exit_.value.code == 2 and f"argument {option}: 0 is not a positive number" in capsys.readouterr().err
