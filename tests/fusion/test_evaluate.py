"""evaluate(): prompts, batching, per-task scores (checked against fusion.evaluation.metrics), inferred tasks,
bad samples, and the `fusion eval` entry (run_eval) on a saved tiny model."""
import argparse
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from fusion.data.datasets import DatasetWarning
from fusion.errors import DatasetError
from fusion.evaluation import metrics
from fusion.evaluation.evaluate import add_eval_arguments, evaluate, format_results, run_eval
from tests.tiny_models import tiny_fusion_model
from tokenizer import FusionTokenizer
from vision import write_video

TEXTS = ["what color is the circle? red", "a blue square at the top left", "which way does it move? left",
         "describe the image. a green triangle", "how many shapes are there? 2", "is there a star? no"] * 40


@pytest.fixture(scope="module")
def model():
    tok = FusionTokenizer.train(TEXTS, vocab_size=300)
    return tiny_fusion_model(tok, num_frames=2)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_media")
    rng = np.random.default_rng(1)
    for name in "abc":
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{name}.png")
    write_video(root / "v.mp4", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), fps=4)
    return root


def row(id, question, answer, images=(), videos=(), **extra):
    return {"id": id, "images": list(images), "videos": list(videos), **extra,
            "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# question -> (the model's answer, the reference)
QA = {
    "v1": ("<image>\nwhat color is shape one?", "The Red.", "red"),
    "v2": ("<image>\nwhat color is shape two?", "green", "blue"),
    "v3": ("<image>\nhow many shapes are there?", "two", "2"),
    "v4": ("<image>\nhow many circles are there?", "3", "3"),
    "d1": ("<video>\nwhich way does it move?", "left", "left"),
    "d2": ("<video>\nwhich way does the square move?", "up", "right"),
    "t1": ("the red circle is alone.\nis there a star?", "No", "no"),
}
CAPTIONS = {"a": "a red circle at the top left", "b": "a blue square at the center",
            "c": "a green triangle and a red circle"}
PREDICTED_CAPTIONS = {"a.png": "a red circle at the top", "b.png": "a blue square in the center",
                      "c.png": "a green triangle"}


def eval_rows():
    rows = [row("v1", QA["v1"][0], "red", ["a.png"], type="color", task="vqa"),
            row("v2", QA["v2"][0], "blue", ["b.png"], type="color", task="vqa"),
            row("v3", QA["v3"][0], "2", ["c.png"], type="count", task="vqa"),
            row("v4", QA["v4"][0], "3", ["a.png"], type="count"),  # task inferred: vqa
            row("c1", "<image>\nDescribe the image.", CAPTIONS["a"], ["a.png"], type="caption", task="caption"),
            row("d1", QA["d1"][0], "left", videos=["v.mp4"], type="direction", task="video-qa"),
            row("gone", "<image>\nwhat color is the lost one?", "red", ["lost.png"], type="color", task="vqa"),
            row("d2", QA["d2"][0], "right", videos=["v.mp4"], type="direction"),  # inferred: video-qa
            row("c3", "<image>\nDescribe the image.", CAPTIONS["b"], ["b.png"], type="caption"),  # inferred: caption
            '{"id": "broken", "conversations": [',
            row("c2", "<image>\nDescribe the image.", "a red circle in the top left corner", ["a.png"],
                type="caption", task="caption"),  # a second reference for a.png (asked the same way)
            row("t1", QA["t1"][0], "no", type="existence"),  # inferred: text
            {"id": "m1", "images": ["a.png"], "type": "shape", "task": "vqa", "conversations": [
                {"role": "user", "content": "<image>\nwhat color is it?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "what shape is it?"}, {"role": "assistant", "content": "circle"}]},
            row("c4", "<image>\nDescribe the image.", CAPTIONS["c"], ["c.png"], type="caption", task="caption")]
    return rows


@pytest.fixture
def controlled(model, monkeypatch):
    """Replace model.chat: it still preprocesses every conversation (so bad media raise as they would), then
    answers from the tables above. Returns the list of calls."""
    calls = []
    answers = {q: a for q, a, _ in QA.values()}
    answers["what shape is it?"] = "circle"

    def chat(conversations, images=None, videos=None, *, max_new_tokens=32, num_frames=None, fps=None, **kwargs):
        calls.append({"prompts": conversations, "images": images, "videos": videos, "training": model.training,
                      "max_new_tokens": max_new_tokens, "kwargs": kwargs})
        for c, im, vi in zip(conversations, images, videos):
            model.processor(c, im, vi, add_generation_prompt=True, num_frames=num_frames, fps=fps)
        outs = []
        for c, im in zip(conversations, images):
            question = c[-1]["content"]
            text = PREDICTED_CAPTIONS[im[0].rsplit("/", 1)[-1]] if "Describe" in question else answers[question]
            outs.append({"text": text, "tokens": [], "logprob": 0.0})
        return outs

    monkeypatch.setattr(model, "chat", chat)
    return calls


def test_scores_per_task_and_type(model, media, controlled):
    path = write_jsonl(media / "eval.jsonl", eval_rows())
    model.train()
    with pytest.warns(DatasetWarning) as caught:
        results = evaluate(model, path, batch_size=2, progress=False, return_predictions=True)
    assert model.training and model.vision.training  # restored as it was
    model.eval()
    assert all(not call["training"] for call in controlled)  # generation ran in eval mode
    messages = [str(w.message) for w in caught]
    assert any("'gone'" in m and "missing image" in m and "eval.jsonl" in m for m in messages)
    assert any("line 10" in m and "malformed json" in m for m in messages)

    tasks = results["tasks"]
    assert set(tasks) == {"vqa", "video-qa", "caption", "text"}
    vqa = tasks["vqa"]
    assert (vqa["count"], vqa["correct"], vqa["accuracy"]) == (5, 4, 0.8)
    assert vqa["by_type"] == {"color": 0.5, "count": 1.0, "shape": 1.0}
    assert vqa["count_by_type"] == {"color": 2, "count": 2, "shape": 1}
    assert vqa["by_type"] == metrics.accuracy_by_type(["The Red.", "green", "two", "3", "circle"],
                                                      ["red", "blue", "2", "3", "circle"],
                                                      ["color", "color", "count", "count", "shape"])
    assert tasks["video-qa"] == {"count": 2, "correct": 1, "accuracy": 0.5, "by_type": {"direction": 0.5},
                                 "count_by_type": {"direction": 2}}
    assert tasks["text"]["accuracy"] == 1.0 and tasks["text"]["by_type"] == {"existence": 1.0}

    # one caption per image; a.png has both its references
    candidates = [PREDICTED_CAPTIONS[n] for n in ("a.png", "b.png", "c.png")]
    references = [[CAPTIONS["a"], "a red circle in the top left corner"], [CAPTIONS["b"]], [CAPTIONS["c"]]]
    caption = tasks["caption"]
    assert (caption["count"], caption["samples"]) == (3, 4)
    assert caption["bleu4"] == pytest.approx(metrics.bleu4(candidates, references))
    assert caption["cider"] == pytest.approx(metrics.cider_d(candidates, references))
    assert caption["bleu4"] > 0 and caption["cider"] > 0

    counts = results["counts"]
    assert counts["records"] == 14 and counts["considered"] == 13 and counts["evaluated"] == 12
    assert counts["skipped"] == 2 and counts["skipped_by_reason"] == {"malformed json": 1, "missing image": 1}
    assert [(e["id"], e["line"], e["reason"]) for e in results["skipped_samples"]] == [
        ("gone", 7, "missing image"), (None, 10, "malformed json")]  # which ones, not only how many
    assert counts["by_task"] == {"caption": 4, "text": 1, "video-qa": 2, "vqa": 5}

    # what the model was asked: the conversation before its last answer, greedy, batches of one task, <= 2
    prompts = [p for call in controlled for p in call["prompts"]]
    multi = next(p for p in prompts if p[-1]["content"] == "what shape is it?")
    assert [m["role"] for m in multi] == ["user", "assistant", "user"]
    assert all(p[-1]["role"] == "user" for p in prompts)
    assert all(call["kwargs"].get("do_sample") is False and len(call["prompts"]) <= 2 for call in controlled)
    for call in controlled:
        kinds = {("caption" if "Describe" in p[-1]["content"] else "video" if v else "other")
                 for p, v in zip(call["prompts"], call["videos"])}
        assert len(kinds) == 1
    assert sum("Describe the image." in p[-1]["content"] for p in prompts) == 3
    longest_caption = max(len(model.tokenizer.encode(c)) for c in CAPTIONS.values())
    assert all(call["max_new_tokens"] >= 16 for call in controlled)
    assert max(call["max_new_tokens"] for call in controlled) >= longest_caption + 8

    predictions = results["predictions"]
    assert [p["id"] for p in predictions] == ["v1", "v2", "v3", "v4", "c1", "d1", "d2", "c3", "t1", "m1", "c4"]
    first = predictions[0]
    assert first["prediction"] == "The Red." and first["references"] == ["red"] and first["correct"] is True
    assert first["images"][0].endswith("a.png") and first["task"] == "vqa" and first["type"] == "color"
    c1 = predictions[4]
    assert c1["ids"] == ["c1", "c2"] and len(c1["references"]) == 2 and "correct" not in c1
    json.dumps(results)  # JSON-serialisable
    table = format_results(results)
    assert "accuracy 0.8000" in table and "skipped 2" in table and "bleu4" in table


@pytest.mark.filterwarnings("ignore::fusion.data.datasets.DatasetWarning")
def test_the_generation_limit_is_per_task_and_the_same_for_any_batch_size(model, media, controlled):
    """Without max_new_tokens each task gets room for its longest reference (+ 8, >= 16), over the whole
    file: a batch of short references does not cut answers that another batch size would have let finish."""
    path = write_jsonl(media / "eval_limits.jsonl", [r for r in eval_rows() if isinstance(r, dict)])
    limits = {}
    for batch_size in (1, 2, 16):
        controlled.clear()
        results = evaluate(model, path, batch_size=batch_size, progress=False)
        limits[batch_size] = results["settings"]["max_new_tokens_by_task"]
        assert {c["max_new_tokens"] for c in controlled} == set(limits[batch_size].values())
    assert limits[1] == limits[2] == limits[16]
    longest_caption = max(len(model.tokenizer.encode(c)) for c in CAPTIONS.values())
    assert limits[1]["caption"] == longest_caption + 8 and limits[1]["vqa"] == 16


def test_another_caption_request_about_the_same_image_is_its_own_generation(model, media, controlled):
    rows = [row("c1", "<image>\nDescribe the image.", CAPTIONS["a"], ["a.png"], task="caption"),
            row("c2", "<image>\nDescribe the colours only.", "red", ["a.png"], task="caption")]
    results = evaluate(model, write_jsonl(media / "eval_prompts.jsonl", rows), progress=False,
                       return_predictions=True)
    assert [p["ids"] for p in results["predictions"]] == [["c1"], ["c2"]]
    assert [p["references"] for p in results["predictions"]] == [[CAPTIONS["a"]], ["red"]]


def test_a_limit_counts_only_the_bad_lines_it_covers(model, media, controlled):
    rows = [r for r in eval_rows() if isinstance(r, dict) and r["id"] != "gone"]
    rows.insert(6, '{"id": "broken", "conversations": [')  # line 7
    path = write_jsonl(media / "eval_limit_bad.jsonl", rows)
    with pytest.warns(DatasetWarning):
        early = evaluate(model, path, limit=3, progress=False)
        late = evaluate(model, path, limit=8, progress=False)
    assert early["counts"]["skipped"] == 0 and early["skipped_samples"] == []
    assert early["counts"]["considered"] == early["counts"]["evaluated"] == 3
    assert late["counts"]["skipped"] == 1 and [e["line"] for e in late["skipped_samples"]] == [7]


def test_limit_and_max_new_tokens(model, media, controlled):
    path = write_jsonl(media / "eval_limit.jsonl", [r for r in eval_rows() if isinstance(r, dict)])
    results = evaluate(model, path, batch_size=16, limit=3, max_new_tokens=5, progress=False)
    assert results["counts"]["considered"] == 3 and results["counts"]["evaluated"] == 3
    assert results["tasks"]["vqa"]["count"] == 3 and set(results["tasks"]) == {"vqa"}
    assert [call["max_new_tokens"] for call in controlled] == [5]
    assert "predictions" not in results
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, path, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):  # not silently the default
        evaluate(model, path, max_new_tokens=0, progress=False)


@pytest.mark.parametrize("option,value,message", [("--batch-size", "0", "must be at least 1, got 0"),
                                                  ("--max-new-tokens", "0", "must be at least 1, got 0"),
                                                  ("--num-frames", "0", "must be at least 1, got 0"),
                                                  ("--limit", "-1", "must be at least 0, got -1"),
                                                  ("--limit", "ten", "expected a whole number, got 'ten'")])
def test_fusion_eval_names_an_option_out_of_range(option, value, message, capsys):
    parser = add_eval_arguments(argparse.ArgumentParser(prog="fusion eval"))
    with pytest.raises(SystemExit):
        parser.parse_args(["model", "data.jsonl", option, value])
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_mostly_bad_evaluation_stops(model, media, controlled):
    rows = [row(f"x{i}", "<image>\nwhat color is shape one?", "red", [f"{'a' if i % 5 == 0 else 'nothere'}.png"],
                task="vqa") for i in range(30)]
    path = write_jsonl(media / "eval_bad.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        with pytest.raises(DatasetError, match="16 of the 20 samples evaluated so far were bad.*missing image x16"):
            evaluate(model, path, batch_size=10, progress=False)


def test_run_eval_writes_json_for_a_saved_model(model, media, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    rows = [row("q1", "<image>\nwhat color is the circle?", "red", ["a.png"], type="color", task="vqa"),
            row("q2", "<image>\nhow many shapes are there?", "2", ["b.png"], type="count", task="vqa"),
            row("cap", "<image>\nDescribe the image.", CAPTIONS["c"], ["c.png"], type="caption", task="caption"),
            row("vid", "<video>\nwhich way does it move?", "left", videos=["v.mp4"], type="direction")]
    data = write_jsonl(tmp_path / "data.jsonl", rows)  # media are elsewhere: --root
    parser = add_eval_arguments(argparse.ArgumentParser(prog="fusion eval"))
    out = tmp_path / "results" / "eval.json"
    args = parser.parse_args([str(model_dir), str(data), "--root", str(media), "--out", str(out), "--batch-size", "2",
                              "--max-new-tokens", "3", "--predictions", "--no-progress", "--device", "cpu"])
    assert run_eval(args) == 0
    results = json.loads(out.read_text())
    assert results["model"] == str(model_dir) and results["dataset"] == str(data)
    assert results["counts"]["evaluated"] == 4 and results["counts"]["skipped"] == 0
    assert set(results["tasks"]) == {"vqa", "caption", "video-qa"}
    assert results["tasks"]["vqa"]["count"] == 2 and 0.0 <= results["tasks"]["vqa"]["accuracy"] <= 1.0
    assert set(results["tasks"]["caption"]) == {"count", "samples", "bleu4", "cider"}
    assert [p["id"] for p in results["predictions"]] == ["q1", "q2", "cap", "vid"]
    assert all(isinstance(p["prediction"], str) for p in results["predictions"])
    printed = capsys.readouterr().out
    assert "vqa" in printed and "results written to" in printed

    missing = parser.parse_args([str(model_dir), str(tmp_path / "nope.jsonl"), "--no-progress", "--device", "cpu"])
    assert run_eval(missing) == 1
    assert "does not exist" in capsys.readouterr().err
    folder = parser.parse_args([str(model_dir), str(data.parent), "--no-progress", "--device", "cpu"])
    assert run_eval(folder) == 1  # a folder, not a file: said so, with the files it holds
    assert f"is a folder; pass the .jsonl or .json file inside it (it holds {data.name}" in capsys.readouterr().err


def test_fusion_eval_shows_a_skipped_sample_as_one_line(model, media, tmp_path):
    """The command prints a skipped sample's warning as one line naming it, not Python's warning format
    (the library's file, line and source line)."""
    import subprocess
    import sys

    model.save_pretrained(tmp_path / "model")
    rows = [row("gone", "<image>\nwhat color is it?", "red", ["gone.png"], type="color"),
            row("q1", "<image>\nwhat color is the circle?", "red", ["a.png"], type="color")]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    done = subprocess.run([sys.executable, "-m", "fusion.cli", "eval", str(tmp_path / "model"), str(data), "--root",
                           str(media), "--no-progress", "--device", "cpu", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "DatasetWarning" in line]
    assert len(warned) == 1 and warned[0].startswith("fusion: DatasetWarning: ")
    assert "'gone'" in warned[0] and "missing image" in warned[0]
    assert "datasets.py" not in done.stderr


def test_shapes_world_file_with_perfect_answers(model, tmp_path, monkeypatch):
    from fusion.data import shapes_world as sw

    sw.generate_shapes_world(tmp_path, sw.ShapesWorldConfig(
        train_images=0, val_images=0, test_images=3, train_videos=0, val_videos=0, test_videos=2, text_samples=0,
        image_size=32, video_size=32, video_frames=6))
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    key = lambda conv, images, videos: (conv[-1]["content"], tuple(images), tuple(videos))  # noqa: E731
    answers = {key(r["conversations"][:-1], [str(tmp_path / p) for p in r["images"]],
                   [str(tmp_path / p) for p in r["videos"]]): r["conversations"][-1]["content"] for r in rows}

    def chat(conversations, images=None, videos=None, **kwargs):
        return [{"text": answers[key(c, im, vi)].upper(), "tokens": [], "logprob": 0.0}
                for c, im, vi in zip(conversations, images, videos)]

    monkeypatch.setattr(model, "chat", chat)
    results = evaluate(model, tmp_path / "test.jsonl", batch_size=4, progress=False)
    tasks = results["tasks"]
    assert set(tasks) == {"vqa", "caption", "video-qa"}
    assert tasks["vqa"]["accuracy"] == tasks["video-qa"]["accuracy"] == 1.0
    assert set(tasks["vqa"]["by_type"]) == {r["type"] for r in rows if r["task"] == "vqa"}
    assert set(tasks["video-qa"]["by_type"]) == {r["type"] for r in rows if r["task"] == "video-qa"}
    assert tasks["caption"]["count"] == 3 and tasks["caption"]["bleu4"] == pytest.approx(1.0)
    assert results["counts"]["evaluated"] == len(rows) and results["counts"]["skipped"] == 0


@pytest.fixture
def saved(model, media, tmp_path):
    """A saved model folder and a one-sample data file; returns their paths and the `fusion eval` parser."""
    model.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [row("q1", "<image>\nwhat color is the circle?", "red", ["a.png"])])
    return tmp_path / "model", data, add_eval_arguments(argparse.ArgumentParser(prog="fusion eval"))


@pytest.mark.parametrize("device,message", [("gpu", "fusion eval: --device: unknown device 'gpu'; use cpu, cuda or "
                                                    "cuda:N"),
                                            ("cuda", "fusion eval: --device is 'cuda' but no CUDA device is "
                                                     "available (torch.cuda.is_available() is False); use cpu")])
def test_fusion_eval_rejects_an_unusable_device_before_loading(device, message, saved, media, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model_dir, data, parser = saved
    args = parser.parse_args([str(model_dir), str(data), "--root", str(media), "--no-progress", "--device", device])
    assert run_eval(args) == 1
    printed = capsys.readouterr()
    assert message in printed.err
    assert printed.out == ""  # nothing evaluated


def test_fusion_eval_rejects_an_out_that_is_not_a_file_path_before_evaluating(saved, media, tmp_path, capsys):
    model_dir, data, parser = saved
    folder = tmp_path / "results"
    folder.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")

    def run(out):
        args = parser.parse_args([str(model_dir), str(data), "--root", str(media), "--out", out, "--no-progress",
                                  "--device", "cpu"])
        return run_eval(args), capsys.readouterr()

    for out in (str(folder), str(folder) + "/", str(tmp_path / "new") + "/"):
        code, printed = run(out)
        assert code == 1 and printed.out == ""  # stopped before the evaluation
        assert f"fusion eval: --out {out!r} names a folder; give a file path" in printed.err
        assert "results.json" in printed.err
    code, printed = run(str(a_file / "eval.json"))
    assert code == 1 and printed.out == ""
    assert f"{str(a_file)!r} is a file, not a folder" in printed.err
    assert list(folder.iterdir()) == [] and a_file.read_text() == "keep me\n"  # no results, no .tmp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "model", "notes.txt", "results"]

    code, printed = run(str(folder / "eval.json"))  # a file path in that folder works
    assert code == 0 and [p.name for p in folder.iterdir()] == ["eval.json"]
    assert json.loads((folder / "eval.json").read_text())["counts"]["evaluated"] == 1


def test_a_reference_that_is_not_text_skips_its_sample(model, media, controlled):
    """A reference holding a lone surrogate (JSON "\\ud800") cannot be encoded: that sample is skipped, counted
    and named, with or without max_new_tokens; the other captions of its image still are references."""
    rows = [row("v1", QA["v1"][0], "red \ud800", ["a.png"], type="color", task="vqa"),
            row("v3", QA["v3"][0], "2", ["c.png"], type="count", task="vqa"),
            row("v4", QA["v4"][0], "3", ["a.png"], type="count", task="vqa"),
            row("c1", "<image>\nDescribe the image.", CAPTIONS["a"], ["a.png"], task="caption"),
            row("c2", "<image>\nDescribe the image.", "a red \ud800 circle", ["a.png"], task="caption"),
            row("c3", "<image>\nDescribe the image.", CAPTIONS["b"], ["b.png"], task="caption")]
    path = write_jsonl(media / "eval_surrogate.jsonl", rows)
    for max_new_tokens in (None, 5):
        with pytest.warns(DatasetWarning) as caught:
            results = evaluate(model, path, max_new_tokens=max_new_tokens, progress=False, return_predictions=True)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and all("lone surrogate" in m for m in messages)
        assert "skipped sample 'v1' (line 1): bad conversation" in messages[0]
        assert [(e["id"], e["line"], e["reason"]) for e in results["skipped_samples"]] == [
            ("v1", 1, "bad conversation"), ("c2", 5, "bad conversation")]
        assert results["counts"]["evaluated"] == 4 and results["counts"]["skipped"] == 2
        assert results["tasks"]["vqa"]["count"] == 2 and results["tasks"]["caption"]["count"] == 2
        assert [p["references"] for p in results["predictions"] if p["task"] == "caption"] == [[CAPTIONS["a"]],
                                                                                               [CAPTIONS["b"]]]


def test_an_empty_or_blank_reference_skips_its_sample(model, media, controlled):
    """A record whose answer is empty or whitespace has nothing to score against: it is skipped, counted and named
    (as training skips it), not scored wrong."""
    rows = [row("v1", QA["v1"][0], "   ", ["a.png"], type="color", task="vqa"),
            row("v3", QA["v3"][0], "2", ["c.png"], type="count", task="vqa"),
            row("v4", QA["v4"][0], "3", ["a.png"], type="count", task="vqa"),
            row("c2", "<image>\nDescribe the image.", "", ["a.png"], task="caption"),
            row("c3", "<image>\nDescribe the image.", CAPTIONS["b"], ["b.png"], task="caption")]
    path = write_jsonl(media / "eval_blank.jsonl", rows)
    with pytest.warns(DatasetWarning) as caught:
        results = evaluate(model, path, progress=False)
    assert [str(w.message).split(": ", 1)[1][:62] for w in caught] == [
        "skipped sample 'v1' (line 1): no supervised tokens: the answer",
        "skipped sample 'c2' (line 4): no supervised tokens: the answer"]
    assert [(e["id"], e["reason"]) for e in results["skipped_samples"]] == [("v1", "no supervised tokens"),
                                                                            ("c2", "no supervised tokens")]
    assert results["counts"]["evaluated"] == 3 and results["tasks"]["vqa"]["count"] == 2


def test_an_evaluation_with_nothing_evaluated_or_mostly_bad_samples_stops(model, media, controlled):
    """Whatever the count: nothing evaluated is an error; more than half bad is one from 5 samples tried."""
    def rows(good, bad):
        return ([row(f"g{i}", QA["v4"][0], "3", ["a.png"], task="vqa") for i in range(good)]
                + [row(f"b{i}", QA["v4"][0], "3", ["lost.png"], task="vqa") for i in range(bad)])

    def run(name, good, bad, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetWarning)
            return evaluate(model, write_jsonl(media / name, rows(good, bad)), progress=False, **kwargs)

    for bad in (1, 3):
        with pytest.raises(DatasetError, match=f"none of the {bad} samples could be evaluated \\(most common: "
                                               f"missing image x{bad}\\); media paths are read relative to root="):
            run("eval_none.jsonl", 0, bad)
    with pytest.raises(DatasetError, match="3 of the 5 samples were bad \\(most common: missing image x3\\)"):
        run("eval_most.jsonl", 2, 3)
    with pytest.raises(DatasetError, match="none of the 1 samples could be evaluated"):  # within a limit too
        run("eval_limit_none.jsonl", 0, 2, limit=1)
    assert run("eval_few.jsonl", 1, 3)["counts"]["evaluated"] == 1  # 4 tried: too few to call it mostly bad
    assert run("eval_half.jsonl", 3, 3)["counts"]["skipped"] == 3  # half is not most
    assert run("eval_some.jsonl", 3, 2)["counts"]["skipped"] == 2
    assert run("eval_zero.jsonl", 1, 0, limit=0)["counts"]["considered"] == 0  # nothing asked for: no error


def test_fusion_eval_fails_when_every_sample_is_skipped(saved, tmp_path, capsys):
    model_dir, data, parser = saved
    out = tmp_path / "eval.json"
    args = parser.parse_args([str(model_dir), str(data), "--root", str(tmp_path / "nowhere"), "--out", str(out),
                              "--no-progress", "--device", "cpu"])
    with pytest.warns(DatasetWarning):
        assert run_eval(args) == 1
    printed = capsys.readouterr()
    assert "none of the 1 samples could be evaluated (most common: missing image x1)" in printed.err
    assert f"root={str(tmp_path / 'nowhere')!r}" in printed.err
    assert printed.out == "" and not out.exists()


def _unwritable_folder(tmp_path):
    """A folder this process cannot create files in: a read-only one, or (as root, whom permissions do not stop)
    /proc."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if os.path.isdir("/proc/self"):
        return "/proc"
    pytest.skip("no folder this process cannot write to")


def test_fusion_eval_checks_that_out_can_be_written_before_loading(saved, media, tmp_path, capsys):
    import pathlib

    model_dir, data, parser = saved

    def run(out):
        args = parser.parse_args([str(model_dir), str(data), "--root", str(media), "--out", str(out), "--no-progress",
                                  "--device", "cpu"])
        return run_eval(args), capsys.readouterr()

    unwritable = pathlib.Path(_unwritable_folder(tmp_path))
    for out in (unwritable / "eval.json", unwritable / "new" / "eval.json", tmp_path / ("r" * 300 + ".json")):
        code, printed = run(out)
        assert code == 1 and printed.out == ""  # stopped before the evaluation
        assert f"fusion eval: --out {str(out)!r}: the results cannot be written there (" in printed.err
        assert "give a file path in a folder you can write to" in printed.err
    assert "File name too long" in printed.err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data.jsonl", "model"] + (
        ["read-only"] if unwritable.parent == tmp_path else []))  # no probe file left behind

    existing = tmp_path / "eval.json"
    existing.write_text("old\n")
    code, printed = run(existing)  # an existing results file is replaced
    assert code == 0 and json.loads(existing.read_text())["counts"]["evaluated"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data.jsonl", "model", "eval.json"] + (
        ["read-only"] if unwritable.parent == tmp_path else []))


def test_fusion_eval_prints_the_results_when_writing_them_fails(saved, media, tmp_path, capsys, monkeypatch):
    import fusion.evaluation.evaluate as evaluate_module

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluate_module, "write_json", full_disk)
    model_dir, data, parser = saved
    out = tmp_path / "results" / "eval.json"
    args = parser.parse_args([str(model_dir), str(data), "--root", str(media), "--out", str(out), "--no-progress",
                              "--device", "cpu", "--predictions", "--max-new-tokens", "2"])
    assert run_eval(args) == 1
    printed = capsys.readouterr()
    error = [line for line in printed.err.splitlines() if "fusion eval" in line]
    assert len(error) == 1 and f"could not write the results to --out {str(out)!r}" in error[0]
    assert "No space left on device" in error[0]
    lines = printed.out.splitlines()
    results = json.loads("\n".join(lines[lines.index("{"):]))  # after the table: the results, not lost
    assert results["counts"]["evaluated"] == 1 and [p["id"] for p in results["predictions"]] == ["q1"]
    assert not out.exists()


def test_fusion_eval_expands_a_home_folder_in_every_path(saved, media, tmp_path, capsys, monkeypatch):
    """`--out=~/...` and `--root=~/...` reach the program with their `~` (no shell expands it after "="), and so
    does a quoted '~/data.jsonl': each is the home folder, as in MODEL_DIR, not a folder called "~"."""
    model_dir, data, parser = saved
    (tmp_path / "media").symlink_to(media, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = parser.parse_args(["~/model", "~/data.jsonl", "--root=~/media", "--out=~/results/eval.json",
                              "--no-progress", "--device", "cpu", "--max-new-tokens", "2"])
    assert run_eval(args) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "results" / "eval.json").read_text())
    assert results["dataset"] == str(data) and results["counts"]["evaluated"] == 1
    assert f"results written to {tmp_path / 'results' / 'eval.json'}" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []  # no folder called "~"


def test_task_names_are_read_in_any_case_and_captioning_is_caption(model, media, controlled):
    rows = [row("c1", "<image>\nDescribe the image.", CAPTIONS["a"], ["a.png"], task="Captioning"),
            row("c3", "<image>\nDescribe the image.", CAPTIONS["b"], ["b.png"], task="captioning"),
            row("c4", "<image>\nDescribe the image.", CAPTIONS["c"], ["c.png"], task="CAPTION"),
            row("v1", QA["v1"][0], "red", ["a.png"], type="color", task="VQA"),
            row("v3", QA["v3"][0], "2", ["c.png"], type="count", task="counting"),
            row("v4", QA["v4"][0], "3", ["a.png"], type="count", task="Counting")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = evaluate(model, write_jsonl(media / "eval_task_names.jsonl", rows), progress=False)
    assert set(results["tasks"]) == {"caption", "vqa", "counting"}
    candidates = [PREDICTED_CAPTIONS[n] for n in ("a.png", "b.png", "c.png")]
    references = [[CAPTIONS["a"]], [CAPTIONS["b"]], [CAPTIONS["c"]]]
    caption = results["tasks"]["caption"]
    assert caption["count"] == 3 and caption["bleu4"] == pytest.approx(metrics.bleu4(candidates, references))
    assert results["tasks"]["counting"] == {"count": 2, "correct": 2, "accuracy": 1.0, "by_type": {"count": 1.0},
                                            "count_by_type": {"count": 2}}
    messages = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert len(messages) == 1  # once for the name, not per sample
    assert "task 'counting' (2 samples) is not one of vqa, video-qa, caption, text" in messages[0]
    assert "scored by normalised exact match" in messages[0] and "eval_task_names.jsonl" in messages[0]
