"""ConversationDataset: JSONL and LLaVA files, paths, bad samples (skipped, counted, named), strict mode,
early stop on mostly bad data, grouping questions per image, DataLoader batching, videos."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fusion.data.collate import Batch, pad_batch
from fusion.data.datasets import (CollatedBatch, Collator, ConversationDataset, DatasetWarning, MediaCache, collate,
                                  infer_task, join_media_groups)
from fusion.errors import DatasetError, ImageLoadError
from tests.tiny_models import tiny_fusion_model
from tokenizer import FusionTokenizer
from vision import write_video

TEXTS = ["what color is the circle? red", "a blue square at the top left", "which way does it move? left",
         "describe the image. a green triangle", "how many shapes are there? 2", "is there a star? no"] * 40


@pytest.fixture(scope="module")
def tok():
    return FusionTokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_fusion_model(tok, num_frames=3)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder with images/a.png .. c.png, a 4-frame video, a corrupt png and a corrupt mp4."""
    root = tmp_path_factory.mktemp("media")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in "abc":
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not a png body" * 4)
    (root / "videos").mkdir()
    write_video(root / "videos" / "v.mp4", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), fps=4)
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    return root


def turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def sample(id, q, a, images=(), videos=(), **extra):
    return {"id": id, "images": list(images), "videos": list(videos), "conversations": turns((q, a)), **extra}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def as_llava(row):
    out = {"id": row["id"], "conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                                               "value": m["content"]} for m in row["conversations"]]}
    if row["images"]:
        out["image"] = row["images"][0] if len(row["images"]) == 1 else row["images"]
    if row["videos"]:
        out["video"] = row["videos"]
    return out


def same_sample(x, y):
    assert x.sample_id == y.sample_id
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert (x.pixel_values is None) == (y.pixel_values is None)
    if x.pixel_values is not None:
        assert torch.equal(x.pixel_values, y.pixel_values)


def supervised_text(tok, s):
    return tok.decode([t for t in s.labels.tolist() if t != -100])


ROWS = [sample("q1", "<image>\nwhat color is the circle?", "red", ["images/a.png"], type="color", task="vqa"),
        sample("q2", "how many shapes are there? <image>", "2", ["images/b.png"], type="count"),
        sample("t1", "is there a star?", "no"),
        sample("two", "<image> <image>\nsame?", "no", ["images/a.png", "images/c.png"])]


# ---------------------------------------------------------------------------------------------------
# Reading


def test_jsonl_and_llava_json_give_identical_samples(model, tok, media):
    jsonl = write_jsonl(media / "data.jsonl", ROWS)
    llava = media / "data_llava.json"
    llava.write_text(json.dumps([as_llava(r) for r in ROWS], indent=1))
    a, b = ConversationDataset(jsonl, model.processor), ConversationDataset(llava, model.processor)
    assert (a.format, b.format) == ("jsonl", "json") and len(a) == len(b) == 4
    for i in range(4):
        same_sample(a[i], b[i])
        assert a.records[i].messages == b.records[i].messages
    assert a[0].pixel_values.shape == (1, 3, 32, 32) and a[3].pixel_values.shape == (2, 3, 32, 32)
    assert supervised_text(tok, a[0]) == "red"
    # the format comes from the content: JSON Lines in a .json file, a JSON list in a .jsonl file
    swapped_jsonl = write_jsonl(media / "lines.json", ROWS)
    swapped_list = media / "list.jsonl"
    swapped_list.write_text(json.dumps([as_llava(r) for r in ROWS]))
    assert ConversationDataset(swapped_jsonl, model.processor).format == "jsonl"
    c = ConversationDataset(swapped_list, model.processor)
    assert c.format == "json"
    same_sample(c[1], a[1])


def test_records_hold_metadata_without_decoding_media(model, media):
    ds = ConversationDataset(write_jsonl(media / "meta.jsonl", ROWS + [
        {"id": "multi", "images": [], "videos": ["videos/v.mp4"], "type": "direction",
         "conversations": turns(("<video>\nwhich way?", "left"), ("and then?", "right"))},
        sample("cap", "<image>\nDescribe the image.", "a red circle", ["images/a.png"], type="caption")]),
        model.processor)
    r = ds.records[0]
    assert (r.id, r.type, r.task, r.answer, r.line) == ("q1", "color", "vqa", "red", 1)
    assert r.images == [os.path.join(str(media), "images/a.png")] and r.videos == []
    assert r.prompt == [{"role": "user", "content": "<image>\nwhat color is the circle?"}]
    multi = ds.records[4]
    assert multi.answer == "right" and [m["role"] for m in multi.prompt] == ["user", "assistant", "user"]
    assert [infer_task(x) for x in ds.records] == ["vqa", "vqa", "text", "vqa", "video-qa", "caption"]
    json.dumps([x.to_dict() for x in ds.records])  # JSON-serialisable


def test_paths_are_relative_to_the_file_folder_or_root(model, media, tmp_path):
    (tmp_path / "sub").mkdir()
    rows = [sample("rel", "<image>\nwhat color?", "red", ["../media_link/a.png"])]
    os.symlink(media / "images", tmp_path / "media_link")
    by_file = ConversationDataset(write_jsonl(tmp_path / "sub" / "d.jsonl", rows), model.processor)
    assert by_file[0] is not None
    rows = [sample("rel", "<image>\nwhat color?", "red", ["images/a.png"]),
            sample("abs", "<image>\nwhat color?", "red", [str(media / "images" / "b.png")])]
    path = write_jsonl(tmp_path / "sub" / "d2.jsonl", rows)
    with pytest.warns(DatasetWarning, match="rel.*missing image"):
        assert ConversationDataset(path, model.processor)[0] is None  # images/ is not under sub/
    ds = ConversationDataset(path, model.processor, root=media)
    expected = model.processor.image_processor(str(media / "images" / "a.png"))[0]
    assert torch.equal(ds[0].pixel_values, expected)
    assert ds[1] is not None and ds.records[1].images == [str(media / "images" / "b.png")]  # absolute kept


def test_text_only_samples(model, tok, media):
    ds = ConversationDataset(write_jsonl(media / "text.jsonl", [ROWS[2]]), model.processor)
    s = ds[0]
    assert s.pixel_values is None and s.sample_id == "t1"
    assert supervised_text(tok, s) == "no"
    assert tok.patch_id not in s.input_ids.tolist()


def test_video_samples_sample_frames(model, media):
    row = sample("v1", "<video>\nwhich way does it move?", "left", videos=["videos/v.mp4"], task="video-qa")
    ds = ConversationDataset(write_jsonl(media / "video.jsonl", [row]), model.processor)
    s = ds[0]
    assert s.pixel_values.shape == (3, 3, 32, 32)  # the model's num_frames=3, one tile per frame
    assert s.frame_timestamps == [pytest.approx([0.0, 0.5, 0.75])]  # frames 0, 2, 3 of 4 at 4 fps
    two = ConversationDataset(media / "video.jsonl", model.processor, num_frames=2)[0]
    assert two.pixel_values.shape[0] == 2


# ---------------------------------------------------------------------------------------------------
# Bad samples


BAD_ROWS = [
    sample("good", "<image>\nwhat color?", "red", ["images/a.png"]),
    sample("no-file", "<image>\nwhat color?", "red", ["images/missing.png"]),
    sample("corrupt", "<image>\nwhat color?", "red", ["images/broken.png"]),
    sample("bad-video", "<video>\nwhich way?", "left", videos=["videos/broken.mp4"]),
    '{"id": "cut", "images": ["images/a.png"], "conversations": [{"role": "us',
    {"id": "no-answer", "images": [], "conversations": [{"role": "user", "content": "hello?"}]},
    {"id": "no-conv", "images": ["images/a.png"]},
    sample("markers", "<image> <image>\nsame?", "no", ["images/a.png"]),
    sample("empty-answer", "what?", ""),
    sample("good2", "is there a star?", "no"),
]


def test_bad_samples_are_skipped_counted_and_named(model, media):
    path = write_jsonl(media / "bad.jsonl", BAD_ROWS)
    with pytest.warns(DatasetWarning) as load_warnings:
        ds = ConversationDataset(path, model.processor)
    load_messages = [str(w.message) for w in load_warnings]
    assert any("line 5" in m and "malformed json" in m and str(path) in m for m in load_messages)
    assert any("'no-answer'" in m and "line 6" in m and "no assistant turn" in m for m in load_messages)
    assert any("'no-conv'" in m and "line 7" in m and "missing field" in m for m in load_messages)
    assert ds.num_bad_at_load == 3 and len(ds) == 7
    assert [r.id for r in ds.records] == ["good", "no-file", "corrupt", "bad-video", "markers", "empty-answer", "good2"]

    expected = {"no-file": "missing image", "corrupt": "unreadable image", "bad-video": "unreadable video",
                "markers": "media count mismatch", "empty-answer": "no supervised tokens"}
    for i, record in enumerate(ds.records):
        if record.id in expected:
            with pytest.warns(DatasetWarning) as caught:
                assert ds[i] is None
            message = str(caught[0].message)
            assert f"'{record.id}'" in message and str(path) in message and expected[record.id] in message
            assert f"line {record.line}" in message
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert ds[i] is not None
    assert ds.bad_counts == {"malformed json": 1, "no assistant turn": 1, "missing field": 1, "missing image": 1,
                             "unreadable image": 1, "unreadable video": 1, "media count mismatch": 1,
                             "no supervised tokens": 1}
    assert (ds.num_attempted, ds.num_bad) == (7, 5)
    assert ds.summary()["bad_counts"] == dict(ds.bad_counts)


def test_a_dataset_may_give_turns_as_typed_parts(model, media):
    parts = {"id": "p", "images": ["images/a.png"],
             "conversations": [{"role": "user",
                                "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
                               {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]}]}
    text = {"id": "t", "images": ["images/a.png"],
            "conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                              {"role": "assistant", "content": "a circle"}]}
    ds = ConversationDataset(write_jsonl(media / "parts.jsonl", [parts, text]), model.processor)
    assert ds.records[0].messages == ds.records[1].messages and ds.records[0].answer == "a circle"
    assert torch.equal(ds[0].input_ids, ds[1].input_ids)


def test_a_url_in_a_dataset_is_named_as_a_url_not_joined_to_the_root(model, media):
    row = {"id": "web", "images": ["https://example.com/cat.png"],
           "conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                             {"role": "assistant", "content": "a cat"}]}
    ds = ConversationDataset(write_jsonl(media / "urls.jsonl", [row]), model.processor)
    assert ds.records[0].images == ["https://example.com/cat.png"]
    with pytest.warns(DatasetWarning, match="'web'.*https:// URL, and fusion never downloads"):
        assert ds[0] is None


def test_strict_mode_raises_dataset_error_naming_the_sample(model, media):
    with pytest.raises(DatasetError, match="line 5.*malformed json"):
        ConversationDataset(write_jsonl(media / "strict.jsonl", BAD_ROWS), model.processor, strict=True)
    ds = ConversationDataset(write_jsonl(media / "strict2.jsonl", BAD_ROWS[:3]), model.processor, strict=True)
    assert ds[0] is not None
    with pytest.raises(DatasetError, match="'no-file'.*missing image") as info:
        ds[1]
    assert isinstance(info.value.__cause__, ImageLoadError)
    assert "strict2.jsonl" in str(info.value)


def test_mostly_bad_data_stops_early(model, media):
    rows = [sample(f"m{i}", "<image>\nwhat color?", "red", [f"images/{'a' if i % 4 == 0 else 'nope'}.png"])
            for i in range(40)]
    ds = ConversationDataset(write_jsonl(media / "mostly_bad.jsonl", rows), model.processor, max_warnings=3)
    seen = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DatasetError) as info:
            for i in range(len(ds)):
                ds[i]
                seen += 1
    assert seen == 19  # the 20th read is the first check: 15 of 20 bad
    message = str(info.value)
    assert "15 of the 20" in message and "missing image x15" in message and "root=" in message
    assert len(caught) == 4  # max_warnings, then one "more bad samples" notice
    # at load time: most lines malformed
    lines = ["{not json"] * 15 + [json.dumps(r) for r in rows[:10]]
    with pytest.raises(DatasetError, match="15 of its 25 records are malformed"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ConversationDataset(write_jsonl(media / "malformed.jsonl", lines), model.processor)
    with pytest.raises(DatasetError, match="none of its 2 records"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ConversationDataset(write_jsonl(media / "allbad.jsonl", ["{", "]"]), model.processor)
    (media / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no samples"):
        ConversationDataset(media / "empty.jsonl", model.processor)


# ---------------------------------------------------------------------------------------------------
# Grouping questions per image


def test_group_by_media_shares_the_image_between_consecutive_questions(model, tok, media):
    rows = [sample("a0", "<image>\nwhat color is the circle?", "red", ["images/a.png"], type="color"),
            sample("a1", "<image>\nhow many shapes are there?", "2", ["images/a.png"], type="count"),
            sample("a2", "<image>\nis there a star?", "no", ["images/a.png"], type="existence"),
            sample("b0", "<image>\nwhat color is the circle?", "blue", ["images/b.png"]),
            sample("t0", "is there a star?", "no"),
            sample("a3", "<image>\nwhat color is the circle?", "green", ["images/a.png"])]  # not consecutive
    path = write_jsonl(media / "group.jsonl", rows)
    flat = ConversationDataset(path, model.processor)
    grouped = ConversationDataset(path, model.processor, group_by_media=True)
    assert len(flat) == 6 and len(grouped) == 4
    assert [r.members for r in grouped.records] == [("a0", "a1", "a2"), (), (), ()]
    assert [r.id for r in grouped.records[0].group] == ["a0", "a1", "a2"] and grouped.records[0].id == "a0"

    s = grouped[0]
    assert s.pixel_values.shape[0] == 1  # the image is encoded once
    assert torch.equal(s.pixel_values, flat[0].pixel_values)
    assert s.input_ids.tolist().count(tok.image_start_id) == 1
    assert supervised_text(tok, s) == "red2no"  # every answer is supervised (with its <|eot|>, not shown)
    assert int((s.labels == tok.eot_id).sum()) == 3
    prefix = int((s.branch_ids == 0).sum())
    for k, i in enumerate((0, 1, 2), start=1):  # each branch is its flat sample's remainder, at the same positions
        branch = s.branch_ids == k
        assert torch.equal(s.input_ids[branch], flat[i].input_ids[prefix:])
        assert torch.equal(s.positions[branch], torch.arange(prefix, len(flat[i].input_ids)))
    for i in (1, 2, 3):
        same_sample(grouped[i], flat[{1: 3, 2: 4, 3: 5}[i]])
    assert len(ConversationDataset(path, model.processor, group_by_media=True, max_group_size=2)) == 5

    # an image marker after the question: the questions differ before the image, so each keeps its own
    rows[1] = sample("a1", "how many shapes are there?<image>", "2", ["images/a.png"], type="count")
    path = write_jsonl(media / "group_late_marker.jsonl", rows)
    s = ConversationDataset(path, model.processor, group_by_media=True)[0]
    assert s.pixel_values.shape[0] == 3 and supervised_text(tok, s) == "red2no"

    # an escaped marker (the literal text "<image>") is text: the question still shares the image
    rows[1] = sample("a1", "<image>\nis \\<image> an html tag?", "yes", ["images/a.png"], type="count")
    path = write_jsonl(media / "group_escaped_marker.jsonl", rows)
    s = ConversationDataset(path, model.processor, group_by_media=True)[0]
    assert s.pixel_values.shape[0] == 1 and supervised_text(tok, s) == "redyesno"


def test_join_media_groups_asks_one_image_every_question_of_every_file(model, tok, media):
    """A stage listing train.jsonl and train_extra.jsonl (more questions about the same images) gets one
    sample per image: the medium is encoded once for the questions of both files, none is lost."""
    first = write_jsonl(media / "join_a.jsonl", [
        sample("a0", "<image>\nwhat color is the circle?", "red", ["images/a.png"]),
        sample("a1", "<image>\nhow many shapes are there?", "2", ["images/a.png"]),
        sample("b0", "<image>\nwhat color is the circle?", "blue", ["images/b.png"]),
        sample("t0", "is there a star?", "no"),
        sample("v0", "<video>\nwhich way does it move?", "left", videos=["videos/v.mp4"])])
    second = write_jsonl(media / "join_b.jsonl", [
        sample("a2", "<image>\nis there a star?", "no", ["images/a.png"]),
        sample("c0", "<image>\nis there a star?", "yes", ["images/c.png"]),  # only this file shows c
        sample("v1", "<video>\nwhat appears?", "a square", videos=["videos/v.mp4"]),
        sample("a3", "<image>\nwhat shape is red?", "circle", ["images/a.png"]),
        sample("t1", "is there a star?", "yes")])
    a = ConversationDataset(first, model.processor, group_by_media=True)
    b = ConversationDataset(second, model.processor, group_by_media=True)
    joined = join_media_groups([a, b])
    assert joined == [a, b]
    assert [r.members or (r.id,) for r in a.records] == [("a0", "a1", "a2", "a3"), ("b0",), ("t0",), ("v0", "v1")]
    assert [r.id for r in b.records] == ["c0", "t1"]  # what the first file does not show stays in its own
    s = a[0]
    assert s.pixel_values.shape[0] == 1 and supervised_text(tok, s) == "red2nocircle"
    assert a[3].pixel_values.shape[0] == len(a[3].frame_timestamps[0])  # the video's frames, once
    assert supervised_text(tok, a[3]) == "lefta square"
    only_extra = ConversationDataset(write_jsonl(media / "join_c.jsonl", [
        sample("a4", "<image>\nis there a star?", "no", ["images/a.png"])]), model.processor, group_by_media=True)
    again = ConversationDataset(first, model.processor, group_by_media=True)
    assert join_media_groups([again, only_extra]) == [again] and len(only_extra) == 0  # emptied: dropped
    assert again.records[0].members == ("a0", "a1", "a4")
    with pytest.raises(ValueError, match="does not group by media"):
        join_media_groups([ConversationDataset(first, model.processor), b])


def test_types_and_media_keep_part_of_a_file_before_grouping(model, tok, media):
    """A stage can leave out question types a model already answers, or train on a file's videos only: the
    records are chosen before grouping, so a kept image is asked only the kept questions."""
    rows = [sample("a0", "<image>\nwhat color is the circle?", "red", ["images/a.png"], type="color"),
            sample("a1", "<image>\nhow many shapes are there?", "2", ["images/a.png"], type="count"),
            sample("a2", "<image>\nwhat shape is red?", "circle", ["images/a.png"], type="shape"),
            sample("v0", "<video>\nwhich way does it move?", "left", videos=["videos/v.mp4"], type="direction"),
            sample("v1", "<video>\nDescribe the video.", "a square moves", videos=["videos/v.mp4"], type="caption"),
            sample("t0", "is there a star?", "no", type="existence")]
    path = write_jsonl(media / "select.jsonl", rows)
    grouped = ConversationDataset(path, model.processor, group_by_media=True, types=["count", "shape", "caption"])
    assert [r.members or (r.id,) for r in grouped.records] == [("a1", "a2"), ("v1",)]
    assert supervised_text(tok, grouped[0]) == "2circle"
    videos = ConversationDataset(path, model.processor, media=["video"])
    assert [r.id for r in videos.records] == ["v0", "v1"]
    both = ConversationDataset(path, model.processor, types=["caption", "existence"], media=["video", "text"])
    assert [r.id for r in both.records] == ["v1", "t0"]
    assert [r.id for r in ConversationDataset(path, model.processor, media=["text"]).records] == ["t0"]
    with pytest.raises(DatasetError, match=r"no record has type in \['relation'\].*types are \['caption', 'color'"):
        ConversationDataset(path, model.processor, types=["relation"])
    with pytest.raises(DatasetError, match=r"unknown media \['audio'\]"):
        ConversationDataset(path, model.processor, media=["audio"])
    with pytest.raises(DatasetError, match="are lists"):
        ConversationDataset(path, model.processor, types="count")


def test_group_by_media_encodes_a_video_once_for_its_questions(model, tok, media, monkeypatch):
    rows = [sample("v0", "<video>\nwhich way does the circle move?", "left", videos=["videos/v.mp4"]),
            sample("v1", "<video>\nwhat appears?", "red square", videos=["videos/v.mp4"]),
            sample("a0", "<image>\nwhat color?", "red", ["images/a.png"])]
    path = write_jsonl(media / "group_video.jsonl", rows)
    flat = ConversationDataset(path, model.processor)
    grouped = ConversationDataset(path, model.processor, group_by_media=True)
    assert [r.members for r in grouped.records] == [("v0", "v1"), ()]
    decoded = []
    real_sample_video = model.processor.sample_video
    monkeypatch.setattr(model.processor, "sample_video", lambda *a, **k: decoded.append(a) or real_sample_video(*a, **k))
    s = grouped[0]
    assert len(decoded) == 1  # the video is decoded once for its two questions
    monkeypatch.undo()
    assert torch.equal(s.pixel_values, flat[0].pixel_values)  # the frames once, not once per question
    assert s.frame_timestamps == flat[0].frame_timestamps
    assert supervised_text(tok, s) == "leftred square"
    prefix = int((s.branch_ids == 0).sum())
    assert s.input_ids[:prefix].tolist().count(tok.patch_id) == int((flat[0].input_ids == tok.patch_id).sum())
    for k in (1, 2):
        assert torch.equal(s.input_ids[s.branch_ids == k], flat[k - 1].input_ids[prefix:])
    with torch.no_grad():  # each branch gets the loss its question gets on its own
        separate = [model(**pad_batch([flat[i]], tok.pad_id).model_inputs()) for i in (0, 1)]
        together = model(**pad_batch([s], tok.pad_id).model_inputs())
    tokens = [int((flat[i].labels != -100).sum()) for i in (0, 1)]
    expected = sum(out.loss.item() * n for out, n in zip(separate, tokens)) / sum(tokens)
    assert together.loss.item() == pytest.approx(expected, rel=1e-4)


def test_group_by_media_keeps_apart_what_cannot_share_a_prefix(model, media):
    system = {"role": "system", "content": "answer briefly"}
    rows = [{"id": "s0", "images": ["images/a.png"], "conversations": [system] + turns(("<image>\ncolor?", "red"))},
            {"id": "s1", "images": ["images/a.png"], "conversations": [system] + turns(("<image>\ncount?", "1"))},
            {"id": "s2", "images": ["images/a.png"],
             "conversations": [{"role": "system", "content": "other"}] + turns(("<image>\nshape?", "circle"))},
            sample("two", "<image><image> same?", "yes", ["images/a.png", "images/a.png"]),
            sample("vid", "<video> <image>", "x", ["images/a.png"], ["videos/v.mp4"])]
    ds = ConversationDataset(write_jsonl(media / "group2.jsonl", rows), model.processor, group_by_media=True)
    assert [r.members for r in ds.records] == [("s0", "s1"), (), (), ()]
    assert ds[0] is not None and int((ds[0].branch_ids == 0).sum()) > 0  # the system turn and image are shared


def test_cache_keeps_processed_samples_and_reads_media_once(model, media, monkeypatch):
    rows = [sample("v0", "<video>\nwhich way?", "left", videos=["videos/v.mp4"]),
            sample("v1", "<video>\nwhat appears?", "red square", videos=["videos/v.mp4"]),
            sample("a0", "<image>\nwhat color?", "red", ["images/a.png"]),
            sample("gone", "<image>\nwhat color?", "red", ["images/missing.png"])]
    path = write_jsonl(media / "cached.jsonl", rows)
    plain = ConversationDataset(path, model.processor, group_by_media=True)
    cached = ConversationDataset(path, model.processor, group_by_media=True, cache=True)
    assert [r.members for r in cached.records] == [("v0", "v1"), (), ()]
    reads = []
    real = model.processor.process_media
    monkeypatch.setattr(model.processor, "process_media", lambda *a, **k: reads.append(a) or real(*a, **k))
    for _ in range(3):
        for i in range(2):
            before = len(reads)
            same_sample(cached[i], plain[i])  # the same sample as without the cache
            assert len(reads) - before in (1, 2)  # plain decodes it each time
        with pytest.warns(DatasetWarning, match="missing image"):
            assert cached[2] is None  # a bad sample is read and counted each time, never kept
    assert len(reads) == 3 * 2 + 2 + 3  # plain: 3 x 2; cached: the video and the image once, the bad one 3 times
    # records read: the group (v0, v1) counts its two records each time
    assert cached.bad_counts == {"missing image": 3} and (cached.num_attempted, cached.num_bad) == (12, 3)
    cached.clear_cache()
    same_sample(cached[0], plain[0])
    assert len(reads) == 3 * 2 + 2 + 3 + 2


def test_a_shared_media_cache_decodes_each_medium_once_for_every_dataset(model, media, monkeypatch):
    first = write_jsonl(media / "first.jsonl", [sample("a0", "<image>\nwhat color?", "red", ["images/a.png"]),
                                                sample("v0", "<video>\nwhich way?", "left", videos=["videos/v.mp4"])])
    more = write_jsonl(media / "more.jsonl", [sample("a1", "<image>\nhow many?", "1", ["images/a.png"]),
                                              sample("t0", "is there a star?", "no")])
    plain = [ConversationDataset(p, model.processor) for p in (first, more)]
    expected = [[d[i] for i in range(len(d))] for d in plain]
    reads = []
    real = model.processor.process_media
    monkeypatch.setattr(model.processor, "process_media", lambda *a, **k: reads.append(a) or real(*a, **k))
    cache = MediaCache()
    datasets = [ConversationDataset(p, model.processor, media_cache=cache) for p in (first, more)]
    for _ in range(2):
        for dataset, samples in zip(datasets, expected):
            for i, want in enumerate(samples):
                same_sample(dataset[i], want)
    assert len(cache) == len(reads) == 3  # a.png (asked by both files), v.mp4, the text-only sample's no media
    assert [[os.path.basename(p) for p in (*images, *videos)] for images, videos in reads] == [["a.png"], ["v.mp4"], []]
    missing = ConversationDataset(write_jsonl(media / "missing.jsonl", [
        sample("gone", "<image>\nwhat color?", "red", ["images/missing.png"])]), model.processor, media_cache=cache)
    with pytest.warns(DatasetWarning, match="missing image"):
        assert missing[0] is None
    assert len(cache) == 3  # what failed to load is not kept


# ---------------------------------------------------------------------------------------------------
# Batching


def test_dataloader_with_the_collate_helper(model, tok, media):
    rows = [sample(f"g{i}", "<image>\nwhat color is the circle?", "red", [f"images/{'abc'[i % 3]}.png"])
            for i in range(5)]
    rows[2] = sample("gone", "<image>\nwhat color?", "red", ["images/missing.png"])
    ds = ConversationDataset(write_jsonl(media / "loader.jsonl", rows), model.processor)
    collate_fn = ds.collate_fn()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, num_workers=0, collate_fn=collate_fn)
    with pytest.warns(DatasetWarning, match="gone"):
        batches = list(loader)
    assert [type(b) for b in batches] == [CollatedBatch, CollatedBatch] and isinstance(batches[0], Batch)
    assert [b.num_dropped for b in batches] == [1, 0] and collate_fn.total_dropped == 1
    assert batches[0].sample_ids == ["g0", "g1"] and batches[1].sample_ids == ["g3", "g4"]
    assert batches[0].pixel_values.shape == (2, 3, 32, 32) and batches[0].input_ids.shape[0] == 2
    moved = batches[0].to("cpu")
    assert isinstance(moved, CollatedBatch) and moved.num_dropped == 1
    with torch.no_grad():
        loss = model(**batches[0].model_inputs()).loss
    assert torch.isfinite(loss)

    packed = collate([ds[0], None, ds[1]], tok.pad_id, pack=True, max_length=1000)
    assert packed.input_ids.shape[0] == 1 and packed.segment_ids is not None and packed.num_dropped == 1
    assert collate([None, None], tok.pad_id) is None
    with pytest.raises(ValueError, match="max_length"):
        Collator(tok.pad_id, pack=True)


def test_dataset_and_collator_pickle_for_workers(model, media):
    ds = ConversationDataset(write_jsonl(media / "pickle.jsonl", ROWS + [
        sample("v1", "<video>\nwhich way?", "left", videos=["videos/v.mp4"])]), model.processor)
    ds[4]  # reading a video leaves no reader behind
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        same_sample(copy[i], ds[i])
    collator = pickle.loads(pickle.dumps(ds.collate_fn(pack=True, max_length=512)))
    assert collator.pack and collator.max_length == 512


def test_llava_list_items_are_named_by_position(model, media):
    path = media / "bad_llava.json"
    path.write_text(json.dumps([as_llava(ROWS[0]), {"id": "empty", "image": "images/a.png"},
                                {"id": "who", "conversations": [{"from": "narrator", "value": "hi"}]},
                                as_llava(ROWS[2])]))
    with pytest.warns(DatasetWarning) as caught:
        ds = ConversationDataset(path, model.processor)
    messages = [str(w.message) for w in caught]
    assert any("'empty' (item 2): missing field" in m for m in messages)
    assert any("'who' (item 3): bad conversation" in m and "narrator" in m for m in messages)
    assert [r.id for r in ds.records] == ["q1", "t1"] and ds.records[1].line == 4
    path.write_text('[{"id": "x", ')
    with pytest.raises(DatasetError, match="not valid JSON"):
        ConversationDataset(path, model.processor)


def test_shapes_world_files_read_and_group(model, tok, tmp_path):
    from fusion.data import shapes_world as sw

    sw.generate_shapes_world(tmp_path, sw.ShapesWorldConfig(
        train_images=3, val_images=0, test_images=0, train_videos=2, val_videos=0, test_videos=0, text_samples=5,
        image_size=32, video_size=32, video_frames=6))
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    flat = ConversationDataset(tmp_path / "train.jsonl", model.processor)
    grouped = ConversationDataset(tmp_path / "train.jsonl", model.processor, group_by_media=True)
    image_rows = [r for r in rows if r["images"]]
    video_rows = [r for r in rows if r["videos"]]
    assert len(flat) == len(rows) and len(grouped) == 3 + 2  # one sample per image, one per video
    assert sum(len(r.members or (r.id,)) for r in grouped.records) == len(rows)
    for i, record in enumerate(grouped.records):
        s = grouped[i]
        if record.images:
            assert s.pixel_values.shape[0] == 1
            answers = [r["conversations"][-1]["content"] for r in image_rows if r["id"] in record.members]
            assert supervised_text(tok, s) == "".join(answers)
        else:
            assert s.pixel_values.shape[0] == 3 and s.frame_timestamps is not None  # the model's 3 frames, once
            ids = record.members or (record.id,)
            answers = [r["conversations"][-1]["content"] for r in video_rows if r["id"] in ids]
            assert answers and supervised_text(tok, s) == "".join(answers)
    text = ConversationDataset(tmp_path / "text.jsonl", model.processor)
    assert len(text) == 5 and all(text[i].pixel_values is None for i in range(5))


def test_split_by_length_keeps_every_sample_and_pads_least():
    import itertools
    import random
    from types import SimpleNamespace

    from fusion.data.collate import split_by_length

    rng = random.Random(0)
    for trial in range(30):
        samples = [SimpleNamespace(input_ids=[0] * rng.randint(1, 60), tag=i) for i in range(rng.randint(1, 9))]
        groups = rng.randint(1, 4)
        out = split_by_length(samples, groups)
        assert sorted(s.tag for g in out for s in g) == list(range(len(samples)))  # each sample once
        assert 1 <= len(out) <= groups and all(out)
        padded = sum(len(g) * max(len(s.input_ids) for s in g) for g in out)
        # brute force: every way to cut the length-sorted samples into at most `groups` runs
        lengths = sorted(len(s.input_ids) for s in samples)
        n = len(lengths)
        best = min(sum((b - a) * lengths[b - 1] for a, b in zip((0, *cuts), (*cuts, n)))
                   for k in range(min(groups, n)) for cuts in itertools.combinations(range(1, n), k))
        assert padded == best, (lengths, groups, [[len(s.input_ids) for s in g] for g in out])
    assert split_by_length([], 2) == []
    with pytest.raises(ValueError, match="groups must be >= 1"):
        split_by_length(samples, 0)


def test_packed_samples_train_each_sample_as_alone_or_padded(tok, media):
    """Images, a video, text and a shared-prefix group, several longer than a chunk (16 tokens; the NoPE layer
    tunes its temperature past position 7): alone, right-padded together or packed into rows (with padding at
    a row's end), the summed token loss, its gradients and the experts' real-token counts are the same."""
    from fusion.data.collate import pack_batch
    from fusion.training_step import supervised_loss_sum

    model = tiny_fusion_model(tok, num_frames=3).train()
    rows = [sample("a0", "<image>\nwhat color is the circle?", "red", ["images/a.png"]),
            sample("a1", "<image>\nhow many shapes are there?", "2 and a green triangle", ["images/a.png"]),
            sample("t0", "is there a star? a blue square at the top left", "no"),
            sample("v0", "<video>\nwhich way does it move?", "left", videos=["videos/v.mp4"]),
            sample("b0", "<image>\nis there a star?", "no", ["images/b.png"])]
    ds = ConversationDataset(write_jsonl(media / "packing.jsonl", rows), model.processor, group_by_media=True)
    samples = [ds[i] for i in range(len(ds))]
    assert samples[0].branch_ids is not None and all(len(s.input_ids) > 16 for s in samples)
    params = list(model.parameters())

    def train(batches):
        model.zero_grad()
        for moe in model.decoder.moe_layers():
            moe.tokens_per_expert.zero_()
        total, count = 0.0, 0
        for batch in batches:
            inputs = batch.model_inputs()
            _, loss, n = supervised_loss_sum(model, inputs, inputs.pop("labels"))
            loss.backward()
            total, count = total + loss.item(), count + int(n)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        return total, count, grads, [moe.tokens_per_expert.clone() for moe in model.decoder.moe_layers()]

    alone = train([pad_batch([s], tok.pad_id) for s in samples])
    longest = max(len(s.input_ids) for s in samples)
    packed_batch = pack_batch(samples, tok.pad_id, max_length=longest + 40)
    assert 1 < packed_batch.input_ids.shape[0] < len(samples) and not packed_batch.attention_mask.all()
    for other in (train([pad_batch(samples, tok.pad_id)]), train([packed_batch])):
        assert other[1] == alone[1]
        assert other[0] == pytest.approx(alone[0], rel=1e-5)
        for a, b in zip(alone[2], other[2]):
            assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())
        for a, b in zip(alone[3], other[3]):
            assert torch.equal(a, b)


def test_packing_never_trains_a_sample_to_predict_the_next_samples_first_token(model, tok):
    """Samples supervised from their first token (a plain language-modelling dataset): packed, the last token of
    one sample must not learn to predict the first token of the next; the loss is that of the padded batch."""
    from fusion.data.collate import pack_batch
    from fusion.processor import ProcessedSample

    generator = torch.Generator().manual_seed(0)
    samples = []
    for n in (10, 7, 5):
        ids = torch.randint(5, len(tok), (n,), generator=generator)
        samples.append(ProcessedSample(input_ids=ids, labels=ids.clone(), pixel_values=None))
    padded, packed = pad_batch(samples, tok.pad_id), pack_batch(samples, tok.pad_id, max_length=100)
    assert packed.input_ids.shape[0] == 1
    targets = lambda b: int((b.labels[:, 1:] != -100).sum())  # noqa: E731 (what the trainer counts)
    assert targets(packed) == targets(padded) == 9 + 6 + 4
    with torch.no_grad():
        assert model(**packed.model_inputs()).loss.item() == pytest.approx(
            model(**padded.model_inputs()).loss.item(), rel=1e-5)


def test_pack_batch_odd_inputs():
    from fusion.data.collate import pack_batch
    from fusion.processor import ProcessedSample

    def make(n, labelled=True):
        ids = torch.arange(5, 5 + n)
        return ProcessedSample(input_ids=ids, labels=ids.clone() if labelled else None, pixel_values=None,
                               sample_id=f"s{n}")

    with pytest.raises(ValueError, match="empty list of samples"):
        pack_batch([], 0, max_length=8)
    for bad in (0, -3, None):
        with pytest.raises(ValueError, match="max_length"):
            pack_batch([make(3)], 0, max_length=bad)
    b = pack_batch([make(3), make(12), make(4)], 0, max_length=10)  # too long for a row: a row of its own
    assert b.input_ids.shape == (3, 12) and b.sample_ids == ["s3", "s12", "s4"]
    assert b.attention_mask.sum(1).tolist() == [3, 12, 4] and b.positions[1].tolist() == list(range(12))
    b = pack_batch([make(3)], 0, max_length=10)
    assert b.input_ids.tolist() == [[5, 6, 7]] and b.segment_ids.tolist() == [[0, 0, 0]]
    b = pack_batch([make(3, labelled=False), make(4, labelled=False)], 0, max_length=10)  # prompts: no labels
    assert b.labels is None and b.input_ids.shape == (1, 7) and b.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3]]


# ---------------------------------------------------------------------------------------------------
# Review fixes: bad records inside groups, repeated questions, line ends, typed parts with paths,
# LLaVA conversations opening with gpt, small record-format cases


def test_a_bad_question_of_a_group_is_left_out_and_named_on_its_own(model, tok, media):
    """One bad record (an empty answer) of a group: the other questions still train, and the warning names
    the bad record (its own id and line), not the group's first."""
    rows = [sample("q1", "<image>\nwhat color?", "red", ["images/a.png"]),
            sample("q2", "<image>\nwhere?", "left", ["images/a.png"]),
            sample("q3", "<image>\nhow many?", "", ["images/a.png"]),
            sample("q4", "<image>\nshape?", "circle", ["images/a.png"])]
    path = write_jsonl(media / "group_one_bad.jsonl", rows)
    ds = ConversationDataset(path, model.processor, group_by_media=True)
    assert len(ds) == 1
    with pytest.warns(DatasetWarning) as caught:
        s = ds[0]
    assert s is not None and supervised_text(tok, s) == "redleftcircle"
    assert s.sample_id == ["q1", "q2", "q4"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped sample 'q3' (line 3)" in message and str(path) in message and "no supervised tokens" in message
    assert ds.bad_counts == {"no supervised tokens": 1} and (ds.num_attempted, ds.num_bad) == (4, 1)
    flat = ConversationDataset(path, model.processor)  # the same loss as the good records apart
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = [flat[i] for i in (0, 1, 3)]
    with torch.no_grad():
        together = model(**pad_batch([s], tok.pad_id).model_inputs()).loss.item()
        apart = [model(**pad_batch([g], tok.pad_id).model_inputs()).loss.item() for g in good]
    counts = [int((g.labels != -100).sum()) for g in good]
    assert together == pytest.approx(sum(l * n for l, n in zip(apart, counts)) / sum(counts), rel=1e-4)
    with pytest.raises(DatasetError, match=r"'q3' \(line 3\).*no supervised tokens"):
        ConversationDataset(path, model.processor, group_by_media=True, strict=True)[0]
    # every record bad: None, each counted
    rows_bad = [sample(f"e{i}", "<image>\nq?", "", ["images/b.png"]) for i in range(3)]
    ds = ConversationDataset(write_jsonl(media / "group_all_bad.jsonl", rows_bad), model.processor,
                             group_by_media=True)
    with pytest.warns(DatasetWarning):
        assert ds[0] is None
    assert (ds.num_attempted, ds.num_bad) == (3, 3)
    # a missing image: each of its questions is bad, named on its own
    rows_gone = [sample(f"g{i}", "<image>\nq?", "a", ["images/gone.png"]) for i in range(2)]
    ds = ConversationDataset(write_jsonl(media / "group_gone.jsonl", rows_gone), model.processor,
                             group_by_media=True)
    with pytest.warns(DatasetWarning) as caught:
        assert ds[0] is None
    assert ["'g0' (line 1)" in str(caught[0].message), "'g1' (line 2)" in str(caught[1].message)] == [True, True]
    assert ds.bad_counts == {"missing image": 2} and (ds.num_attempted, ds.num_bad) == (2, 2)


def test_mostly_bad_judges_records_not_groups(model, media):
    """20 empty answers among 120 questions (24 images x 5): grouped, it trains as it does ungrouped."""
    rows = [sample(f"{k}-{q}", f"<image>\nq{q}?", "" if (q == 3 and k < 20) else "red",
                   [f"images/{'abc'[k % 3]}.png"]) for k in range(24) for q in range(5)]
    path = write_jsonl(media / "group_some_bad.jsonl", rows)
    for grouped in (False, True):
        ds = ConversationDataset(path, model.processor, group_by_media=grouped, max_warnings=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = [ds[i] for i in range(len(ds))]
        assert (ds.num_attempted, ds.num_bad) == (120, 20)
        assert sum(o is None for o in out) == (0 if grouped else 20)
    # a mostly bad grouped file still stops
    rows = [sample(f"{k}-{q}", f"<image>\nq{q}?", "" if q else "red", [f"images/{'ab'[k % 2]}.png"])
            for k in range(10) for q in range(4)]
    ds = ConversationDataset(write_jsonl(media / "group_mostly_bad.jsonl", rows), model.processor,
                             group_by_media=True, max_warnings=0)
    with pytest.raises(DatasetError, match="15 of the 20 samples read so far were bad"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(len(ds)):
                ds[i]


def test_a_bad_record_joined_from_another_file_is_named_with_its_file(model, media):
    first = write_jsonl(media / "join_named_a.jsonl", [sample("a0", "<image>\nwhat color?", "red", ["images/a.png"])])
    second = write_jsonl(media / "join_named_b.jsonl", [sample("t0", "hi", "yo"),
                                                        sample("a1", "<image>\nwhere?", " ", ["images/a.png"])])
    a = ConversationDataset(first, model.processor, group_by_media=True)
    b = ConversationDataset(second, model.processor, group_by_media=True)
    join_media_groups([a, b])
    assert a.records[0].members == ("a0", "a1")
    with pytest.warns(DatasetWarning) as caught:
        assert a[0] is not None
    message = str(caught[0].message)
    assert message.startswith(f"{second}: skipped sample 'a1' (line 2)") and str(first) not in message


def test_repeated_questions_keep_every_answer_token_in_the_loss(model, tok, media):
    """The same question asked again with other answers (or COCO-style captions under one prompt): the
    shared prefix stops before the answers, so the grouped loss is the separate samples' loss."""
    for name, question, answers in (
            ("dup", "what color is the circle?", ["red", "dark red", "red circle", "red"]),
            ("coco", "Describe the image.", ["a red circle at the top", "a blue square", "a red circle and a square",
                                             "two shapes"])):
        rows = [sample(f"{name}{k}", f"<image>\n{question}", a, ["images/a.png"]) for k, a in enumerate(answers)]
        path = write_jsonl(media / f"repeat_{name}.jsonl", rows)
        flat = ConversationDataset(path, model.processor)
        s = ConversationDataset(path, model.processor, group_by_media=True)[0]
        separate = [flat[i] for i in range(len(rows))]
        counts = [int((x.labels != -100).sum()) for x in separate]
        assert int((s.labels != -100).sum()) == sum(counts)
        assert supervised_text(tok, s) == "".join(answers)
        with torch.no_grad():
            apart = [model(**pad_batch([x], tok.pad_id).model_inputs()).loss.item() for x in separate]
            together = model(**pad_batch([s], tok.pad_id).model_inputs()).loss.item()
        assert together == pytest.approx(sum(l * n for l, n in zip(apart, counts)) / sum(counts), rel=1e-4)
        assert s.pixel_values.shape[0] == 1  # the image is still shared


def test_share_prefix_never_holds_a_label_nor_starts_a_later_branch_with_one():
    from fusion.data.collate import share_prefix
    from fusion.processor import ProcessedSample

    def make(ids, first_label):
        ids = torch.tensor(ids)
        labels = torch.where(torch.arange(len(ids)) >= first_label, ids, torch.tensor(-100))
        return ProcessedSample(input_ids=ids, labels=labels, pixel_values=None)

    samples = [make([1, 2, 3, 4, 5, 6], 4), make([1, 2, 3, 4, 5, 7, 8], 4), make([1, 2, 3, 4, 9], 4)]
    s = share_prefix(samples, patch_id=99)
    prefix = int((s.branch_ids == 0).sum())
    assert prefix == 3  # before the first label (index 4) of the later branches, less one
    assert bool((s.labels[:prefix] == -100).all())
    # the model predicts label t from position t - 1: each branch's labels are those of its sample
    for k, x in enumerate(samples, start=1):
        branch = s.branch_ids == k
        assert torch.equal(s.labels[branch][(s.labels[branch] != -100)], x.labels[x.labels != -100])
        assert torch.equal(s.positions[branch], torch.arange(prefix, len(x.input_ids)))


def test_jsonl_lines_end_at_newline_only(model, tok, media):
    """U+2028, U+2029 and U+0085 inside JSON strings (valid JSON Lines written with ensure_ascii=False) are
    text, not line ends; line numbers stay those of the file."""
    rows = [sample("a", "hi", "one\u2028two"), sample("b", "hi\x85there", "ok"), sample("c", "hi", "x\u2029y"),
            sample("d", "<image>\nq?", "fine", ["images/gone.png"])]
    path = media / "u2028.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ConversationDataset(path, model.processor)
    assert [(r.id, r.line) for r in ds.records] == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    assert ds.records[0].answer == "one\u2028two" and ds.records[1].messages[0]["content"] == "hi\x85there"
    with pytest.warns(DatasetWarning, match=r"'d' \(line 4\)"):
        assert ds[3] is None


def _stage(media, data):
    from fusion.train_config import TrainConfig
    return TrainConfig.from_dict({"name": "x", "output_dir": str(media / "run"), "model": {"init_from": "default"},
                                  "stages": [{"name": "s", "data": data, "group_by_media": True, "join_files": True,
                                              "steps": 1, "batch_size": 1, "lr": {"decoder": 1e-3}}]},
                                 base_dir=str(media))


def test_join_files_refuses_entries_it_would_join_wrongly(model, media):
    """join_files with a file listed again (its records would be asked twice in one sample) or with files
    about the same media but different repeat (a joined sample has one repeat) is refused, naming them."""
    from fusion.data.stage_data import load_stage_data
    from fusion.errors import ConfigError

    rows = [sample(f"{m}{q}", f"<image>\nq{q}?", "red", [f"images/{m}.png"]) for m in "ab" for q in range(2)]
    write_jsonl(media / "join_rep.jsonl", rows + [sample("t", "hi", "yo")])
    write_jsonl(media / "join_rep_extra.jsonl", [sample("a9", "<image>\nmore?", "no", ["images/a.png"])])
    config = _stage(media, ["join_rep.jsonl", {"path": "join_rep.jsonl", "media": ["image"], "repeat": 2}])
    with pytest.raises(ConfigError, match=r"join_files: data entries 1 \(join_rep.jsonl\) and 2 \(join_rep.jsonl\) "
                                          r"both hold record 'a0'"):
        load_stage_data(config, config.stages[0], model)
    config = _stage(media, ["join_rep.jsonl", {"path": "join_rep_extra.jsonl", "repeat": 2}])
    with pytest.raises(ConfigError, match=r"join_rep.jsonl \(repeat 1\) and join_rep_extra.jsonl \(repeat 2\) ask "
                                          r"about the same media"):
        load_stage_data(config, config.stages[0], model)
    # the same repeat, or a file listed again for its text records only, is fine
    config = _stage(media, ["join_rep.jsonl", {"path": "join_rep_extra.jsonl"},
                            {"path": "join_rep.jsonl", "media": ["text"], "repeat": 3}])
    data = load_stage_data(config, config.stages[0], model)
    members = [m for d in data.datasets for r in d.records for m in (r.members or (r.id,))]
    assert sorted(members) == sorted(["a0", "a1", "a9", "b0", "b1", "t"] + ["t"] * 3)


def test_typed_parts_may_carry_their_media_paths(model, tok, media):
    """Hugging Face-style parts {"type": "image", "image": path} (or "path"/"url") give the record's images
    when it has no images list; both ways at once is refused, naming both."""
    listed = sample("listed", "<image>\nWhat is it?", "a circle", ["images/a.png"])
    def hf(id, part, **extra):
        return {"id": id, **extra, "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "\nWhat is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]}]}
    rows = [listed,
            hf("in-part", {"type": "image", "image": "images/a.png"}),
            hf("path-key", {"type": "image", "path": "images/a.png"}),
            hf("both", {"type": "image", "image": "images/a.png"}, images=["images/b.png"]),
            hf("web", {"type": "image", "url": "https://example.com/cat.png"}),
            {"id": "two", "messages": [{"role": "user", "content": [
                {"type": "image", "image": "images/a.png"}, {"type": "text", "text": " and "},
                {"type": "image", "image": "images/c.png"}]}, {"role": "assistant", "content": "same"}]},
            {"id": "vid", "messages": [{"role": "user", "content": [{"type": "video", "video": "videos/v.mp4"}]},
                                       {"role": "assistant", "content": "left"}]},
            {"id": "half", "messages": [{"role": "user", "content": [
                {"type": "image", "image": "images/a.png"}, {"type": "image"}]},
                {"role": "assistant", "content": "x"}]}]
    with pytest.warns(DatasetWarning) as caught:
        ds = ConversationDataset(write_jsonl(media / "hf_parts.jsonl", rows), model.processor)
    messages = [str(w.message) for w in caught]
    assert any("'both'" in m and "conflicting media" in m and "'images'" in m and "{'type': 'image'} parts" in m
               for m in messages)
    assert any("'half'" in m and "missing field" in m and "part(s) [2]" in m for m in messages)
    by_id = {r.id: i for i, r in enumerate(ds.records)}
    assert sorted(by_id) == ["in-part", "listed", "path-key", "two", "vid", "web"]
    assert ds.records[by_id["in-part"]].images == [str(media / "images/a.png")]
    assert ds.records[by_id["two"]].images == [str(media / "images/a.png"), str(media / "images/c.png")]
    assert ds.records[by_id["vid"]].videos == [str(media / "videos/v.mp4")]
    for name in ("in-part", "path-key"):
        same_sample(ds[by_id[name]], dataclasses_replace_id(ds[by_id["listed"]], name))
    assert ds[by_id["two"]].pixel_values.shape[0] == 2 and ds[by_id["vid"]] is not None
    with pytest.warns(DatasetWarning, match="'web'.*https:// URL, and fusion never downloads"):
        assert ds[by_id["web"]] is None


def dataclasses_replace_id(s, sample_id):
    import dataclasses
    return dataclasses.replace(s, sample_id=sample_id)


def test_llava_turns_before_the_first_question_are_dropped(model, tok, media):
    """A LLaVA conversation that opens with a gpt turn: that turn answers nothing, so it is dropped (as LLaVA's
    preprocessing does), not trained."""
    rows = [{"id": "gpt-first", "image": "images/a.png",
             "conversations": [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "<image>\nWhat?"},
                               {"from": "gpt", "value": "red"}]},
            {"id": "system-gpt", "image": "images/a.png",
             "conversations": [{"from": "system", "value": "be brief"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
            {"id": "plain", "image": "images/a.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
            {"id": "only-gpt", "conversations": [{"from": "gpt", "value": "Hello"}]}]
    path = media / "gpt_first.json"
    path.write_text(json.dumps(rows))
    with pytest.warns(DatasetWarning, match=r"'only-gpt' \(item 4\): no assistant turn"):
        ds = ConversationDataset(path, model.processor)
    assert [m["role"] for m in ds.records[0].messages] == ["user", "assistant"]
    assert [m["role"] for m in ds.records[1].messages] == ["system", "user", "assistant"]
    assert supervised_text(tok, ds[0]) == supervised_text(tok, ds[1]) == "red"
    assert torch.equal(ds[0].input_ids, ds[2].input_ids)


def test_small_record_format_cases(model, tok, media):
    """A whitespace-only answer is bad like an empty one; `images` and `image` together are refused (naming
    both keys); a number as a turn's value is its text."""
    rows = [sample("ws", "hi", " "), sample("nl", "hi", "\n"),
            {"id": "both", "images": ["images/a.png"], "image": "images/b.png",
             "conversations": turns(("<image>x", "red"))},
            {"id": "both-videos", "videos": ["videos/v.mp4"], "video": "videos/v.mp4",
             "conversations": turns(("<video>x", "red"))},
            {"id": "num", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": 4}]},
            {"id": "float", "conversations": [{"from": "human", "value": "half?"}, {"from": "gpt", "value": 0.5}]},
            {"id": "null-images", "images": None, "image": "images/a.png", "conversations": turns(("<image>x", "red"))}]
    with pytest.warns(DatasetWarning) as caught:
        ds = ConversationDataset(write_jsonl(media / "small_cases.jsonl", rows), model.processor)
    messages = [str(w.message) for w in caught]
    assert any("'both' (line 3): conflicting media" in m and "'images'" in m and "'image'" in m for m in messages)
    assert any("'both-videos' (line 4): conflicting media" in m and "'videos'" in m and "'video'" in m
               for m in messages)
    assert [r.id for r in ds.records] == ["ws", "nl", "num", "float", "null-images"]
    for i in (0, 1):
        with pytest.warns(DatasetWarning, match="no supervised tokens"):
            assert ds[i] is None
    assert ds.bad_counts["no supervised tokens"] == 2
    assert supervised_text(tok, ds[2]) == "4" and supervised_text(tok, ds[3]) == "0.5"
    assert ds.records[4].images == [str(media / "images/a.png")] and ds[4] is not None


def test_a_lone_surrogate_in_a_sample_skips_that_sample(model, media):
    path = media / "surrogate.jsonl"
    good = {"id": "good", "conversations": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "a cat"}]}
    lines = [json.dumps(good), json.dumps({**good, "id": "cut"}).replace("a cat", "a cat \\ud83d")]
    path.write_text("\n".join(lines) + "\n")  # valid JSON; the escape decodes to half an emoji
    ds = ConversationDataset(path, model.processor)
    assert ds[0] is not None
    with pytest.warns(DatasetWarning, match=r"'cut'.*lone surrogate"):
        assert ds[1] is None
    assert ds.bad_counts == {"bad conversation": 1}


def test_an_empty_media_string_is_a_text_only_sample(model, tok, media):
    """Table exports (pandas, HF datasets) write "" for "no image" in a mixed LLaVA file."""
    text_turns = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    rows = [{"id": "null", "image": None, "conversations": text_turns},
            {"id": "empty-image", "image": "", "conversations": text_turns},
            {"id": "empty-video", "video": "", "conversations": text_turns},
            {"id": "empty-both", "images": "", "image": "", "conversations": text_turns},
            {"id": "pic", "image": "images/a.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}]
    path = media / "empty_media.json"
    path.write_text(json.dumps(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ConversationDataset(path, model.processor)
    assert [r.id for r in ds.records] == ["null", "empty-image", "empty-video", "empty-both", "pic"]
    for i in range(4):
        assert ds.records[i].images == ds.records[i].videos == [] and ds[i].pixel_values is None
        assert torch.equal(ds[i].input_ids, ds[0].input_ids)
    assert ds[4].pixel_values is not None


def test_a_file_that_is_not_utf8_is_named_with_what_to_do(model, media):
    line = json.dumps(sample("é", "où?", "là"), ensure_ascii=False) + "\n"
    for encoding, hint in (("utf-16", "UTF-16 byte-order mark"), ("latin-1", "the byte at offset 8 is not UTF-8")):
        path = media / f"{encoding}.jsonl"
        path.write_bytes(line.encode(encoding))
        with pytest.raises(DatasetError, match=f"{encoding}.jsonl: is not UTF-8 text.*{hint}.*save it as UTF-8"):
            ConversationDataset(path, model.processor)


def test_one_object_wrapping_the_samples_is_named_as_such(model, media):
    wrapped = {"data": [sample("a", "hi", "yes")]}
    for name, text in (("pretty", json.dumps(wrapped, indent=2)), ("one_line", json.dumps(wrapped))):
        path = media / f"wrapped_{name}.json"
        path.write_text(text)
        with pytest.raises(DatasetError, match="is one JSON object.*the list under 'data'"):
            ConversationDataset(path, model.processor)


def test_a_one_line_file_whose_sample_has_a_typo_names_the_typo(model, media):
    """One sample on one line is a sample (not a wrapper object): its own mistake is named, with a guess."""
    typo = {"id": "only", "images": ["images/a.png"],
            "conversation": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red"}]}
    for name, rows in (("one", [typo]), ("two", [typo, dict(typo, id="other")])):
        with pytest.raises(DatasetError, match="records are malformed|can be used"), \
                pytest.warns(DatasetWarning, match="has no 'conversations' list \\(it has 'conversation': did you "
                                                   "mean 'conversations'\\?\\)"):
            ConversationDataset(write_jsonl(media / f"typo_{name}.jsonl", rows), model.processor)


def test_an_image_part_of_a_dropped_leading_assistant_turn_keeps_its_image(model, tok, media):
    parts = {"id": "parts", "conversations": [
        {"role": "assistant", "content": [{"type": "image", "image": "images/a.png"}]},
        {"role": "user", "content": "What?"}, {"role": "assistant", "content": "red"}]}
    marker = {"id": "marker", "image": "images/a.png", "conversations": [
        {"from": "gpt", "value": "<image>"}, {"from": "human", "value": "What?"}, {"from": "gpt", "value": "red"}]}
    ds = ConversationDataset(write_jsonl(media / "leading_parts.jsonl", [parts, marker]), model.processor)
    assert ds.records[0].images == ds.records[1].images == [str(media / "images" / "a.png")]
    assert torch.equal(ds[0].input_ids, ds[1].input_ids) and ds[0].pixel_values is not None
