"""The shapes world generator: deterministic, disjoint splits, correct and balanced answers, pixels and
frames that agree with the recorded scenes."""
import dataclasses
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.data import shapes_world as sw

SMALL = dict(train_images=40, val_images=12, test_images=12, train_videos=12, val_videos=4, test_videos=4,
             text_samples=60)
PALETTE = {**sw.COLOR_RGB, "background": (0, 0, 0)}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_split(root, split):
    return read_jsonl(root / f"{split}.jsonl")


def nearest_color(rgb, names):
    """Which of `names` (palette colours or "background") is closest to `rgb`."""
    rgb = np.asarray(rgb, dtype=np.int32)
    return min(names, key=lambda n: int(((rgb - np.asarray(PALETTE[n])) ** 2).sum()))


def decode_video(path):
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_world")
    config = sw.ShapesWorldConfig(seed=7, **SMALL)
    counts = sw.generate_shapes_world(root, config)
    return root, config, counts


# ---------------------------------------------------------------------------------------------------
# An independent answer key: answers derived from the scene geometry and the question's words only.


def cell_of(obj, image_size):
    cell = image_size / 3
    cx, cy = obj["center"]
    return int(cy // cell), int(cx // cell)


def place_words(row, col):
    return "center" if (row, col) == (1, 1) else f"{['top', 'middle', 'bottom'][row]} {['left', 'center', 'right'][col]}"


def answer_image_question(question, objects, image_size):
    """Answer `question` about `objects` (recorded scene) from first principles; asserts it is unambiguous."""
    objs = [dict(o, rc=cell_of(o, image_size)) for o in objects]
    for o in objs:
        o["place"] = place_words(*o["rc"])

    def only(matches):
        assert len(matches) == 1, f"ambiguous or missing referent in {question!r}: {matches}"
        return matches[0]

    def name(o):
        return f"{o['color']} {o['shape']}"

    q = question
    if m := re.fullmatch(r"What color is the shape at the (.+)\?", q):
        return only([o for o in objs if o["place"] == m[1]])["color"]
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        return only([o for o in objs if o["shape"] == m[1]])["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        return only([o for o in objs if o["color"] == m[1]])["shape"]
    if m := re.fullmatch(r"What shape is at the (.+)\?", q):
        return only([o for o in objs if o["place"] == m[1]])["shape"]
    if q == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(sum(o["shape"] == m[1] for o in objs))
    if m := re.fullmatch(r"Where is the (\w+) object\?", q):
        return only([o for o in objs if o["color"] == m[1]])["place"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        return only([o for o in objs if name(o) == f"{m[1]} {m[2]}"])["place"]
    if m := re.fullmatch(r"Where is the (\w+)\?", q):
        return only([o for o in objs if o["shape"] == m[1]])["place"]
    if m := re.fullmatch(r"Is there an? (\w+) shape\?", q):
        return "yes" if any(o["color"] == m[1] for o in objs) else "no"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        return "yes" if any(name(o) == f"{m[1]} {m[2]}" for o in objs) else "no"
    if m := re.fullmatch(r"Is there an? (\w+)\?", q):
        return "yes" if any(o["shape"] == m[1] for o in objs) else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", q):
        a = only([o for o in objs if name(o) == m[1]])
        b = only([o for o in objs if name(o) == m[3]])
        (ra, ca), (rb, cb) = a["rc"], b["rc"]
        truth = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[m[2]]
        return "yes" if truth else "no"
    raise AssertionError(f"question the answer key does not know: {q!r}")


def video_facts(video):
    """Per object name: (event, direction, frame) read off the recorded tracks, not the recorded labels."""
    facts = {}
    for o in video["objects"]:
        visible = [p is not None for p in o["track"]]
        points = [p for p in o["track"] if p is not None]
        if all(visible):
            (x0, y0), (x1, y1) = points[0], points[-1]
            dx, dy = x1 - x0, y1 - y0
            if abs(dx) < 1 and abs(dy) < 1:
                facts[f"{o['color']} {o['shape']}"] = ("static", None, None)
            elif abs(dx) > abs(dy):
                facts[f"{o['color']} {o['shape']}"] = ("move", "right" if dx > 0 else "left", None)
            else:
                facts[f"{o['color']} {o['shape']}"] = ("move", "down" if dy > 0 else "up", None)
        elif not visible[0]:
            facts[f"{o['color']} {o['shape']}"] = ("appear", None, visible.index(True))
        else:
            facts[f"{o['color']} {o['shape']}"] = ("disappear", None, visible.index(False))
    return facts


def answer_video_question(question, video):
    facts = video_facts(video)
    if m := re.fullmatch(r"Which way does the (\w+ \w+) move\?", question):
        event, direction, _ = facts[m[1]]
        assert event == "move"
        return direction
    if question in ("What appears?", "What disappears?"):
        kind = "appear" if question == "What appears?" else "disappear"
        doers = [n for n, (event, _, _) in facts.items() if event == kind]
        assert len(doers) == 1, (question, facts)
        return doers[0]
    if m := re.fullmatch(r"Which happens first: the (\w+ \w+) (appears|disappears) or the (\w+ \w+) (appears|disappears)\?",
                         question):
        (ea, _, ta), (eb, _, tb) = facts[m[1]], facts[m[3]]
        assert (ea + "s", eb + "s") == (m[2], m[4])
        assert abs(ta - tb) >= 2, "events too close to order"
        return m[1] if ta < tb else m[3]
    raise AssertionError(f"question the answer key does not know: {question!r}")


# ---------------------------------------------------------------------------------------------------


def test_counts_and_files(world):
    root, config, counts = world
    for split in sw.SPLITS:
        n_images, n_videos = config.split_sizes(split)
        assert counts[split]["images"] == n_images and counts[split]["videos"] == n_videos
        rows = read_split(root, split)
        assert len(rows) == counts[split]["samples"]
        assert len({r["images"][0] for r in rows if r["images"]}) == n_images
        assert len({r["videos"][0] for r in rows if r["videos"]}) == n_videos
        for r in rows:
            for rel in r["images"] + r["videos"]:
                assert (root / rel).is_file()
    assert len(read_jsonl(root / "text.jsonl")) == counts["text"]["samples"] == config.text_samples
    world_json = json.loads((root / "world.json").read_text())
    assert world_json["config"]["seed"] == 7 and world_json["counts"] == json.loads(json.dumps(counts))
    assert world_json["answers"]["count"] == ["0", "1", "2", "3"]


def test_sample_schema(world):
    root, _, _ = world
    tasks = Counter()
    for split in sw.SPLITS:
        for r in read_split(root, split):
            assert list(r)[:6] == ["id", "images", "videos", "conversations", "type", "task"]
            user, assistant = r["conversations"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            tasks[r["task"]] += 1
            if r["task"] in ("vqa", "caption"):
                assert len(r["images"]) == 1 and r["videos"] == [] and user["content"].startswith("<image>\n")
            else:
                assert r["task"] == "video-qa" and r["type"] in sw.VIDEO_QUESTION_TYPES
                assert len(r["videos"]) == 1 and r["images"] == [] and user["content"].startswith("<video>\n")
            answer = assistant["content"]
            if r["task"] != "caption":
                assert answer == answer.lower().strip() and 1 <= len(answer.split()) <= 2
    assert set(tasks) == {"vqa", "caption", "video-qa"}
    ids = [r["id"] for split in sw.SPLITS for r in read_split(root, split)]
    assert len(ids) == len(set(ids))


def test_same_seed_gives_identical_files_and_pixels(world, tmp_path):
    root, config, _ = world
    again = tmp_path / "again"
    sw.generate_shapes_world(again, sw.ShapesWorldConfig(seed=7, **SMALL))
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "text.jsonl", "world.json"):
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    for png in sorted((root / "images").rglob("*.png")):
        twin = again / png.relative_to(root)
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(twin))), png
    for mp4 in sorted((root / "videos").rglob("*.mp4"))[:4]:
        assert np.array_equal(decode_video(mp4), decode_video(again / mp4.relative_to(root))), mp4

    other = tmp_path / "other"
    sw.generate_shapes_world(other, sw.ShapesWorldConfig(seed=8, **SMALL))
    assert (root / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()


def test_splits_share_no_image_or_video(world):
    root, _, _ = world
    paths, hashes = {}, {}
    for split in sw.SPLITS:
        rows = read_split(root, split)
        paths[split] = {p for r in rows for p in r["images"] + r["videos"]}
        hashes[split] = {hashlib.sha256(np.asarray(Image.open(root / p)).tobytes()).hexdigest()
                         for p in paths[split] if p.endswith(".png")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not paths[a] & paths[b]
        assert not hashes[a] & hashes[b], f"{a} and {b} share an image"


def test_every_answer_is_right_for_the_recorded_scene(world):
    root, config, _ = world
    checked = Counter()
    for split in sw.SPLITS:
        for r in read_split(root, split):
            question = r["conversations"][0]["content"].split("\n", 1)[1]
            answer = r["conversations"][1]["content"]
            if r["task"] == "vqa":
                assert answer_image_question(question, r["meta"]["objects"], config.image_size) == answer, question
            elif r["task"] == "video-qa":
                assert answer_video_question(question, r["meta"]) == answer, question
            else:
                assert question == sw.CAPTION_PROMPT and answer == sw.caption_for(r["meta"]["objects"])
            checked[r["type"]] += 1
    assert set(checked) >= set(sw.IMAGE_QUESTION_TYPES) | set(sw.VIDEO_QUESTION_TYPES) | {"caption"}


def test_recorded_positions_agree_with_geometry(world):
    root, config, _ = world
    for r in read_split(root, "train"):
        if r["task"] != "caption":
            continue
        objects = r["meta"]["objects"]
        assert 1 <= len(objects) <= config.max_shapes
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        cell = config.image_size / 3
        for o in objects:
            assert (o["row"], o["col"]) == cell_of(o, config.image_size)
            assert o["position"] == place_words(o["row"], o["col"])
            # the whole shape (its box of half-size radius) stays inside its own cell: no overlaps
            cx, cy = o["center"]
            assert o["col"] * cell < cx - o["radius"] and cx + o["radius"] < (o["col"] + 1) * cell
            assert o["row"] * cell < cy - o["radius"] and cy + o["radius"] < (o["row"] + 1) * cell


def test_image_pixels_show_the_recorded_shapes(world):
    root, config, _ = world
    for split in sw.SPLITS:
        for r in read_split(root, split):
            if r["task"] != "caption":
                continue
            pixels = np.asarray(Image.open(root / r["images"][0]).convert("RGB"))
            assert pixels.shape == (config.image_size, config.image_size, 3)
            for o in r["meta"]["objects"]:
                x, y = (int(v) for v in o["center"])
                assert tuple(pixels[y, x]) == sw.COLOR_RGB[o["color"]], (r["id"], o)
            assert tuple(pixels[0, 0]) == config.background  # a cell corner is always empty


def test_captions_are_canonical():
    objects = [
        {"shape": "square", "color": "blue", "row": 2, "col": 2, "position": "bottom right"},
        {"shape": "circle", "color": "red", "row": 0, "col": 0, "position": "top left"},
        {"shape": "triangle", "color": "green", "row": 1, "col": 1, "position": "center"},
    ]
    assert sw.caption_for(objects) == ("a red circle at the top left, a green triangle at the center "
                                       "and a blue square at the bottom right.")
    assert sw.caption_for(objects[:2]) == "a red circle at the top left and a blue square at the bottom right."
    assert sw.caption_for(objects[1:2]) == "a red circle at the top left."


def test_answers_are_balanced_within_each_type(tmp_path):
    config = sw.ShapesWorldConfig(seed=3, train_images=240, val_images=0, test_images=0, train_videos=48,
                                  val_videos=0, test_videos=0, text_samples=0)
    samples, _, _ = sw.generate_split(str(tmp_path), "train", config)
    answers = defaultdict(Counter)
    for s in samples:
        if s["type"] != "caption":
            answers[s["type"]][s["conversations"][1]["content"]] += 1
    vocab = sw.answer_vocabulary(config)
    for qtype in sw.IMAGE_QUESTION_TYPES + ("direction",):
        counts = [answers[qtype][a] for a in vocab[qtype]]
        assert max(counts) - min(counts) <= max(3, 0.15 * np.mean(counts)), (qtype, answers[qtype])
    for qtype in ("appeared", "disappeared", "first"):  # 12 possible names, ~12-20 questions each
        assert max(answers[qtype].values()) <= 3, (qtype, answers[qtype])
    # "which happens first" questions name the earlier event first as often as second
    mention = Counter(s["meta"]["template"] for s in samples if s["type"] == "first")
    assert abs(mention["first_answer_mentioned_first"] - mention["first_answer_mentioned_second"]) <= 2


def test_video_frames_show_the_recorded_events(world):
    root, config, _ = world
    videos = {}
    for split in sw.SPLITS:
        for r in read_split(root, split):
            if r["videos"]:
                videos[r["videos"][0]] = r["meta"]
    assert videos
    names = list(config.colors) + ["background"]
    size = config.video_size
    for rel, video in videos.items():
        frames = decode_video(root / rel)
        assert frames.shape == (config.video_frames, size, size, 3)
        for o in video["objects"]:
            home = next(p for p in o["track"] if p is not None)
            for f, point in enumerate(o["track"]):
                x, y = (int(v) for v in (point or home))
                seen = nearest_color(frames[f, y, x], names)
                assert seen == (o["color"] if point is not None else "background"), (rel, o["event"], f)
            if o["event"] == "appear":
                assert o["track"][0] is None and o["track"][-1] is not None
            if o["event"] == "disappear":
                assert o["track"][0] is not None and o["track"][-1] is None
            if o["event"] == "move":
                # the centroid of the shape's colour, within its own half of the frame, moves that way
                rgb = np.asarray(sw.COLOR_RGB[o["color"]], dtype=np.int32)
                x0, y0 = home
                region = np.zeros((size, size), dtype=bool)
                if len(video["objects"]) == 1:
                    region[:] = True
                elif o["direction"] in ("left", "right"):
                    region[(slice(0, size // 2) if y0 < size / 2 else slice(size // 2, size)), :] = True
                else:
                    region[:, (slice(0, size // 2) if x0 < size / 2 else slice(size // 2, size))] = True
                centroids = []
                for f in (0, len(frames) - 1):
                    mask = (np.abs(frames[f].astype(np.int32) - rgb).sum(-1) < 90) & region
                    ys, xs = np.nonzero(mask)
                    centroids.append((xs.mean(), ys.mean()))
                (cx0, cy0), (cx1, cy1) = centroids
                step = {"left": cx0 - cx1, "right": cx1 - cx0, "up": cy0 - cy1, "down": cy1 - cy0}[o["direction"]]
                assert step > size / 4, (rel, o["direction"], centroids)


def test_text_corpus_is_text_only_and_answerable(world):
    root, config, _ = world
    rows = read_jsonl(root / "text.jsonl")
    assert {r["task"] for r in rows} == {"text"}
    types = Counter(r["type"] for r in rows)
    assert set(types) >= {"caption", "color", "direction"}
    place = {w: (r, c) for r in range(3) for c in range(3) for w in [place_words(r, c)]}
    cell = config.image_size / 3
    for r in rows:
        assert r["images"] == [] and r["videos"] == []
        user, answer = r["conversations"][0]["content"], r["conversations"][1]["content"]
        assert "<image>" not in user and "<video>" not in user
        if r["type"] in sw.IMAGE_QUESTION_TYPES:
            # the scene is described in words; re-read it and answer the question from the description
            description, question = user.split("\n")
            objects = []
            for color, shape, where in re.findall(r"an? (\w+) (\w+) at the ([a-z ]+?)(?:,| and|\.)", description):
                row, col = place[where]
                objects.append({"color": color, "shape": shape, "center": [(col + 0.5) * cell, (row + 0.5) * cell]})
            assert sw.caption_for([dict(o, row=cell_of(o, config.image_size)[0], col=cell_of(o, config.image_size)[1],
                                        position=place_words(*cell_of(o, config.image_size))) for o in objects]) \
                == description
            assert answer_image_question(question, objects, config.image_size) == answer, user


def test_new_concepts_appear_in_every_image(tmp_path):
    config = sw.new_concept_config(new_shapes=["star"], new_colors=["purple"], seed=1, train_images=30,
                                   val_images=5, test_images=5, train_videos=4, val_videos=0, test_videos=0,
                                   text_samples=10)
    assert config.shapes == ("circle", "square", "triangle", "star") and "purple" in config.colors
    sw.generate_shapes_world(tmp_path, config)
    rows = [r for r in read_split(tmp_path, "train") if r["task"] == "caption"]
    assert len(rows) == 30
    for r in rows:
        objects = r["meta"]["objects"]
        assert any(o["shape"] == "star" or o["color"] == "purple" for o in objects)
        pixels = np.asarray(Image.open(tmp_path / r["images"][0]))
        for o in objects:
            x, y = (int(v) for v in o["center"])
            assert tuple(pixels[y, x]) == sw.COLOR_RGB[o["color"]]
    for r in read_split(tmp_path, "train"):
        if r["task"] == "vqa":
            assert answer_image_question(r["conversations"][0]["content"][len("<image>\n"):], r["meta"]["objects"],
                                         config.image_size) == r["conversations"][1]["content"]


def test_every_shape_is_drawn_and_contains_its_centre():
    for shape in sw.SHAPE_NAMES:
        pixels = sw.render_shapes([{"shape": shape, "color": "white", "center": [16.3, 15.7], "radius": 7.0}], 32)
        filled = (pixels.sum(-1) > 0).sum()
        assert tuple(pixels[15, 16]) == (255, 255, 255), shape
        assert 60 < filled < 4 * 7.5 * 7.5, (shape, filled)
        assert pixels[:6].sum() == 0 and pixels[27:].sum() == 0  # nothing outside the shape's box


def test_bad_config_says_what_to_do():
    with pytest.raises(ValueError, match="unknown shapes.*choose from"):
        sw.ShapesWorldConfig(shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="unknown colors"):
        sw.ShapesWorldConfig(colors=("red", "octarine"))
    with pytest.raises(ValueError, match="video_size must be even"):
        sw.ShapesWorldConfig(video_size=63)


def test_command_line_writes_a_dataset(tmp_path, capsys):
    counts = sw.main([str(tmp_path / "cli"), "--seed", "2", "--train-images", "6", "--val-images", "2",
                      "--test-images", "2", "--train-videos", "2", "--val-videos", "1", "--test-videos", "1",
                      "--text-samples", "5", "--shapes", "circle,star", "--colors", "red,purple"])
    assert counts["train"] == {"images": 6, "videos": 2, "samples": counts["train"]["samples"]}
    assert "wrote" in capsys.readouterr().out
    world_json = json.loads((tmp_path / "cli" / "world.json").read_text())
    assert world_json["config"]["shapes"] == ["circle", "star"] and world_json["config"]["seed"] == 2
    assert len(read_jsonl(tmp_path / "cli" / "text.jsonl")) == 5


def test_command_line_names_a_bad_setting_as_a_usage_error(tmp_path, capsys):
    from fusion.cli import main as fusion_cli

    with pytest.raises(SystemExit) as exited:
        fusion_cli(["shapes-world", str(tmp_path / "cli"), "--train-images", "-5"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "fusion shapes-world: error: train-images must be >= 0, got -5" in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_narration_says_then_only_for_a_later_event():
    def clip(*events):
        return {"events": [dict(zip(("frame", "object", "event"), e)) for e in events]}

    assert sw.narrate_video(clip((2, "red circle", "appears"), (5, "blue square", "disappears"))) == \
        "the red circle appears. then the blue square disappears."
    assert sw.narrate_video(clip((3, "red circle", "appears"), (3, "blue square", "disappears"))) == \
        "the red circle appears. the blue square disappears."


def straddling_shapes(root, sample, image_size):
    """Check a jittered scene (centres in the cells their positions name, drawn where recorded, inside the
    image, no overlaps) and count its shapes that reach out of their cells."""
    cell = image_size / 3
    objects = sample["meta"]["objects"]
    pixels = np.asarray(Image.open(root / sample["images"][0]).convert("RGB"))
    straddling = 0
    for o in objects:
        assert (o["row"], o["col"]) == cell_of(o, image_size)
        x, y = (int(v) for v in o["center"])
        assert tuple(pixels[y, x]) == sw.COLOR_RGB[o["color"]], (sample["id"], o)
        cx, cy = o["center"]
        inside = (o["col"] * cell < cx - o["radius"] and cx + o["radius"] < (o["col"] + 1) * cell
                  and o["row"] * cell < cy - o["radius"] and cy + o["radius"] < (o["row"] + 1) * cell)
        straddling += not inside
        assert o["radius"] < min(cx, cy) and max(cx, cy) < image_size - o["radius"]  # not clipped
    for a, b in ((a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
        gap = np.hypot(a["center"][0] - b["center"][0], a["center"][1] - b["center"][1])
        assert gap > a["radius"] + b["radius"], (sample["id"], a, b)
    return straddling


def test_train_jitter_moves_training_shapes_off_their_cells_centre_only(world, tmp_path):
    """Jittered training shapes straddle cell (and patch) edges like video shapes, yet keep their centre
    in the cell their position names, stay inside the image, never overlap and are drawn where recorded;
    val and test are byte-identical to an unjittered world's."""
    root, config, _ = world
    jittered = tmp_path / "jittered"
    sw.generate_shapes_world(jittered, sw.ShapesWorldConfig(seed=7, train_jitter=1.0, **SMALL))
    straddling = sum(straddling_shapes(jittered, r, config.image_size)
                     for r in read_split(jittered, "train") if r["task"] == "caption")
    assert straddling >= 10  # most of the ~80 shapes of 40 images; none without jitter (test above)
    for split in ("val", "test"):
        assert (jittered / f"{split}.jsonl").read_bytes() == (root / f"{split}.jsonl").read_bytes()
    with pytest.raises(ValueError, match="train_jitter must be in 0..1"):
        sw.ShapesWorldConfig(train_jitter=1.5)


def test_train_extra_questions_ask_training_images_more_of_a_type_only(world, tmp_path):
    """Extra relation questions per training image go to train_extra.jsonl: distinct from each other and from
    the image's usual questions, right for the scene, about both answers alike, image by image; every other
    file is byte-identical to the plain world's."""
    root, config, _ = world
    extra = tmp_path / "extra"
    sw.generate_shapes_world(extra, sw.ShapesWorldConfig(seed=7, train_extra_questions={"relation": 6}, **SMALL))
    for split in ("train", "val", "test"):
        assert (extra / f"{split}.jsonl").read_bytes() == (root / f"{split}.jsonl").read_bytes()
    assert not (root / "train_extra.jsonl").exists()
    usual = {}
    for r in read_split(extra, "train"):
        if r["task"] in ("vqa", "caption"):
            usual.setdefault(r["images"][0], []).append(r["conversations"][0]["content"])
    rows = [json.loads(line) for line in (extra / "train_extra.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(r["images"][0] for r in rows))
    assert order == [p for p in usual if p in set(order)]  # image by image, in the train split's order
    relation_counts, answers = [], Counter()
    for path in order:
        mine = [r for r in rows if r["images"][0] == path]
        objects = mine[0]["meta"]["objects"]
        texts = [r["conversations"][0]["content"] for r in mine]
        assert len(set(texts)) == len(texts) and not set(texts) & set(usual[path])  # nothing asked twice
        possible = len(objects) * (len(objects) - 1) * 4
        already = sum("left of" in t or "right of" in t or "above" in t or "below" in t for t in usual[path])
        assert all(r["type"] == "relation" for r in mine) and len(mine) == min(6, possible - already)
        for r in mine:
            question = r["conversations"][0]["content"].split("\n", 1)[1]
            assert answer_image_question(question, objects, config.image_size) == r["conversations"][1]["content"]
            answers[r["conversations"][1]["content"]] += 1
        relation_counts.append(len(mine))
    assert max(relation_counts) == 6 and abs(answers["yes"] - answers["no"]) <= 0.1 * sum(answers.values())
    counts = json.loads((extra / "world.json").read_text())["counts"]
    assert counts["train_extra"] == {"samples": len(rows)}
    # the same file, written into an existing plain world without drawing its media again
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    sw.rewrite_train_extra(plain, sw.ShapesWorldConfig(seed=7, train_extra_questions={"relation": 6}, **SMALL))
    assert (plain / "train_extra.jsonl").read_bytes() == (extra / "train_extra.jsonl").read_bytes()
    assert (plain / "world.json").read_bytes() == (extra / "world.json").read_bytes()
    sw.rewrite_train_extra(plain, sw.ShapesWorldConfig(seed=7, **SMALL))
    assert not (plain / "train_extra.jsonl").exists()
    assert (plain / "world.json").read_bytes() == (root / "world.json").read_bytes()
    with pytest.raises(ValueError, match=r"other \['seed'\]; only train_extra_questions, train_extra_balanced "
                                         r"and train_extra_offgrid_images can change"):
        sw.rewrite_train_extra(plain, sw.ShapesWorldConfig(seed=8, **SMALL))
    assert sw.main([str(tmp_path / "cli"), "--train-images", "4", "--val-images", "1", "--test-images", "1",
                    "--train-videos", "0", "--val-videos", "0", "--test-videos", "0", "--text-samples", "0",
                    "--train-extra-questions", "relation=2,position=1"])
    saved = json.loads((tmp_path / "cli" / "world.json").read_text())["config"]
    assert saved["train_extra_questions"] == {"position": 1, "relation": 2}
    with pytest.raises(ValueError, match="train_extra_questions names 'relations'.*choose from"):
        sw.ShapesWorldConfig(train_extra_questions={"relations": 2})
    with pytest.raises(ValueError, match=r"train_extra_questions\['relation'\] must be an integer >= 0"):
        sw.ShapesWorldConfig(train_extra_questions={"relation": -1})


def test_train_extra_balanced_keeps_yes_and_no_even_where_every_question_would_not(world, tmp_path):
    """All relation questions of the scenes are mostly "no"; balanced extras are half "yes", each still right
    for its scene and new to its image, and switching the option rewrites only train_extra.jsonl."""
    root, config, _ = world

    def extra_answers(folder):
        rows = [json.loads(line) for line in (folder / "train_extra.jsonl").read_text().splitlines()]
        for r in rows:
            question = r["conversations"][0]["content"].split("\n", 1)[1]
            assert answer_image_question(question, r["meta"]["objects"], config.image_size) == \
                r["conversations"][1]["content"]
        return Counter(r["conversations"][1]["content"] for r in rows), rows

    every = tmp_path / "every"
    shutil.copytree(root, every)
    sw.rewrite_train_extra(every, sw.ShapesWorldConfig(seed=7, train_extra_questions={"relation": 24}, **SMALL))
    every_answers, _ = extra_answers(every)
    assert every_answers["no"] > 1.3 * every_answers["yes"]  # the scenes' own mix
    balanced = tmp_path / "balanced"
    shutil.copytree(every, balanced)
    sw.rewrite_train_extra(balanced, sw.ShapesWorldConfig(seed=7, train_extra_questions={"relation": 24},
                                                          train_extra_balanced=True, **SMALL))
    answers, rows = extra_answers(balanced)
    assert abs(answers["yes"] - answers["no"]) <= 1
    assert answers["yes"] >= 0.9 * every_answers["yes"]  # nearly every "yes" question is still asked
    usual = {(tuple(r["images"]), r["conversations"][0]["content"]) for r in read_split(root, "train")}
    assert not {(tuple(r["images"]), r["conversations"][0]["content"]) for r in rows} & usual
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "text.jsonl"):
        assert (balanced / name).read_bytes() == (root / name).read_bytes()
    assert json.loads((balanced / "world.json").read_text())["config"]["train_extra_balanced"] is True
    assert sw.main([str(tmp_path / "cli"), "--train-images", "4", "--val-images", "1", "--test-images", "1",
                    "--train-videos", "0", "--val-videos", "0", "--test-videos", "0", "--text-samples", "0",
                    "--train-extra-questions", "relation=2", "--train-extra-balanced"])
    assert json.loads((tmp_path / "cli" / "world.json").read_text())["config"]["train_extra_balanced"] is True


def test_train_extra_balanced_can_name_the_types_to_balance(world, tmp_path):
    """`train_extra_balanced: [relation]` keeps relation answers even and asks every position question it can
    (position answers are even anyway; balancing them would leave about one question per image)."""
    root, config, _ = world
    train = read_split(root, "train")

    def extra(balanced, questions=(("relation", 24), ("position", 4))):
        rows = sw.extra_question_samples(train, sw.ShapesWorldConfig(
            seed=7, train_extra_questions=dict(questions), train_extra_balanced=balanced, **SMALL))
        return {t: Counter(r["conversations"][1]["content"] for r in rows if r["type"] == t)
                for t in ("relation", "position")}

    named, every, unbalanced = extra(["relation"]), extra(True), extra(False)
    assert abs(named["relation"]["yes"] - named["relation"]["no"]) <= 1
    assert sum(named["relation"].values()) == sum(every["relation"].values())
    assert sum(named["position"].values()) == sum(unbalanced["position"].values())
    assert sum(named["position"].values()) > 2 * sum(every["position"].values())
    assert sw.main([str(tmp_path / "cli"), "--train-images", "4", "--val-images", "1", "--test-images", "1",
                    "--train-videos", "0", "--val-videos", "0", "--test-videos", "0", "--text-samples", "0",
                    "--train-extra-questions", "relation=2,position=1", "--train-extra-balanced", "relation"])
    assert json.loads((tmp_path / "cli" / "world.json").read_text())["config"]["train_extra_balanced"] == ["relation"]
    with pytest.raises(ValueError, match=r"train_extra_balanced names \['count'\], which train_extra_questions "
                                         r"does not ask"):
        sw.ShapesWorldConfig(train_extra_questions={"relation": 2}, train_extra_balanced=["count"])
    with pytest.raises(ValueError, match="must be true, false or a list of question types"):
        sw.ShapesWorldConfig(train_extra_questions={"relation": 2}, train_extra_balanced="relation")


def test_train_video_captions_name_every_shape_of_each_training_clip(world, tmp_path):
    """Each training video gets one caption (its events in order) right after its questions; nothing else
    changes: the same questions in the same order, val and test byte-identical."""
    root, _, _ = world
    captioned = tmp_path / "captioned"
    sw.generate_shapes_world(captioned, sw.ShapesWorldConfig(seed=7, train_video_captions=True, **SMALL))
    plain, rows = read_split(root, "train"), read_split(captioned, "train")
    assert [r for r in rows if r["type"] != "caption" or r["images"]] == plain
    captions = [r for r in rows if r["videos"] and r["type"] == "caption"]
    assert len(captions) == SMALL["train_videos"]
    for r in captions:
        position = rows.index(r)
        assert rows[position - 1]["videos"] == r["videos"]  # grouped with the clip's questions
        assert r["conversations"][0]["content"] == "<video>\nDescribe the video." and r["task"] == "caption"
        text = r["conversations"][1]["content"]
        assert text == sw.narrate_video(r["meta"])
        for o in r["meta"]["objects"]:
            assert f"the {o['color']} {o['shape']} " in text
    for split in ("val", "test"):
        assert (captioned / f"{split}.jsonl").read_bytes() == (root / f"{split}.jsonl").read_bytes()


def test_train_extra_offgrid_images_add_jittered_training_images_to_the_extra_file_only(world, tmp_path):
    """Off-grid images go to train_extra.jsonl after the extra questions: their shapes straddle cell edges,
    their questions are right and their captions canonical; every other file stays byte-identical, and the
    setting can be switched on and off in an existing world without drawing anything else again."""
    root, config, _ = world
    settings = dict(seed=7, train_extra_questions={"relation": 2}, **SMALL)
    questions_only = tmp_path / "questions_only"
    sw.generate_shapes_world(questions_only, sw.ShapesWorldConfig(**settings))
    offgrid = tmp_path / "offgrid"
    sw.generate_shapes_world(offgrid, sw.ShapesWorldConfig(**settings, train_extra_offgrid_images=30))
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "text.jsonl"):
        assert (offgrid / name).read_bytes() == (root / name).read_bytes()
    before = read_jsonl(questions_only / "train_extra.jsonl")
    rows = read_jsonl(offgrid / "train_extra.jsonl")
    assert rows[:len(before)] == before  # the extra questions first, as without off-grid images
    added = rows[len(before):]
    assert {r["images"][0] for r in added} == {f"images/train_extra/{i:06d}.png" for i in range(30)}
    assert not {r["images"][0] for r in added} & {p for r in read_split(root, "train") for p in r["images"]}
    straddling = 0
    for r in added:
        objects, asked = r["meta"]["objects"], r["conversations"][0]["content"].split("\n", 1)[1]
        if r["task"] == "caption":
            assert r["conversations"][1]["content"] == sw.caption_for(objects)
            straddling += straddling_shapes(offgrid, r, config.image_size)
        else:
            assert answer_image_question(asked, objects, config.image_size) == r["conversations"][1]["content"]
    assert straddling >= 15  # most of the ~60 shapes of 30 images
    assert Counter(r["type"] for r in added)["shape"] == 30  # one of each type per image, as in the train split
    assert json.loads((offgrid / "world.json").read_text())["counts"]["train_extra"] == {"samples": len(rows)}
    # switched on, then off, in an existing world
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    sw.rewrite_train_extra(plain, sw.ShapesWorldConfig(**settings, train_extra_offgrid_images=30))
    assert (plain / "train_extra.jsonl").read_bytes() == (offgrid / "train_extra.jsonl").read_bytes()
    assert (plain / "world.json").read_bytes() == (offgrid / "world.json").read_bytes()
    for i in (0, 29):
        image = f"images/train_extra/{i:06d}.png"
        assert (plain / image).read_bytes() == (offgrid / image).read_bytes()
    sw.rewrite_train_extra(plain, sw.ShapesWorldConfig(seed=7, **SMALL))
    assert not (plain / "train_extra.jsonl").exists() and not (plain / "images" / "train_extra").exists()
    assert (plain / "world.json").read_bytes() == (root / "world.json").read_bytes()
    with pytest.raises(ValueError, match="train_extra_offgrid_images must be >= 0"):
        sw.ShapesWorldConfig(train_extra_offgrid_images=-1)
    assert sw.main([str(tmp_path / "cli"), "--train-images", "2", "--val-images", "1", "--test-images", "1",
                    "--train-videos", "0", "--val-videos", "0", "--test-videos", "0", "--text-samples", "0",
                    "--train-extra-offgrid-images", "3"])
    assert len(list((tmp_path / "cli" / "images" / "train_extra").iterdir())) == 3


# ---------------------------------------------------------------------------------------------------
# Review fixes: settings that hung, repeated questions, unvalidated settings, honest documentation.

ROOT = Path(__file__).resolve().parents[2]


def test_one_shape_worlds_finish_and_ask_no_relation_question(tmp_path):
    """max_shapes=1 has no relation question: the text corpus used to draw scenes for one forever."""
    out = tmp_path / "one_shape"
    code = ("import sys; from fusion.data import shapes_world as sw; "
            "sw.generate_shapes_world(sys.argv[1], sw.ShapesWorldConfig(max_shapes=1, seed=1, train_images=12, "
            "val_images=2, test_images=2, train_videos=4, val_videos=0, test_videos=0, text_samples=60))")
    try:
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, check=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("generating a max_shapes=1 world did not finish in 120 s")
    text = read_jsonl(out / "text.jsonl")
    assert len(text) == 60
    scene_types = Counter(s["type"] for s in text if "\n" in s["conversations"][0]["content"]
                          and s["type"] in sw.IMAGE_QUESTION_TYPES)
    assert set(scene_types) == set(sw.IMAGE_QUESTION_TYPES) - {"relation"}  # the other types in turn
    for s in text:
        if s["type"] in sw.IMAGE_QUESTION_TYPES:
            caption, question = s["conversations"][0]["content"].split("\n", 1)
            assert caption.startswith(("a ", "an ")) and " and " not in caption  # one shape
    train = read_split(out, "train")
    assert "relation" not in {s["type"] for s in train}
    assert all(len(s["meta"]["objects"]) == 1 for s in train if s["task"] == "vqa")


def test_more_than_six_questions_per_image_are_distinct_and_zero_video_questions_means_none(tmp_path):
    config = sw.ShapesWorldConfig(seed=0, questions_per_image=12, train_images=30, val_images=0, test_images=0,
                                  train_videos=4, val_videos=0, test_videos=0, text_samples=0,
                                  questions_per_video=0)
    samples, _, n_videos = sw.generate_split(str(tmp_path), "train", config)
    by_image = defaultdict(list)
    for s in samples:
        if s["task"] == "vqa":
            by_image[s["images"][0]].append(s)
    assert len(by_image) == 30
    for path, rows in by_image.items():
        texts = [r["conversations"][0]["content"] for r in rows]
        assert len(texts) == len(set(texts)), (path, Counter(texts).most_common(2))
        for r in rows:
            question = r["conversations"][0]["content"].split("\n", 1)[1]
            assert answer_image_question(question, r["meta"]["objects"], config.image_size) == \
                r["conversations"][1]["content"]
    assert max(len(rows) for rows in by_image.values()) > 6  # scenes with more questions still get them
    # questions_per_video=0: the clips are drawn (the same clips as with questions), nobody asks about them
    assert n_videos == 4 and len(list((tmp_path / "videos" / "train").iterdir())) == 4
    assert not [s for s in samples if s["task"] == "video-qa"]
    rng, balancer = np.random.default_rng(0), sw.AnswerBalancer()
    video, primary = sw.plan_video(0, config, balancer, rng)
    assert sw.choose_video_questions(video, primary, config, balancer, rng) == []
    one = dataclasses.replace(config, questions_per_video=1)
    assert sw.choose_video_questions(video, primary, one, balancer, rng) == [primary]


@pytest.mark.parametrize("setting, value, message", [
    ("video_fps", 0, "video_fps must be a number > 0"),
    ("video_fps", -4, "video_fps must be a number > 0"),
    ("video_fps", float("nan"), "video_fps must be a number > 0"),
    ("video_crf", 99, r"video_crf must be an integer in 0\.\.51"),
    ("video_crf", -1, r"video_crf must be an integer in 0\.\.51"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("seed", 1.5, "seed must be an integer >= 0"),
    ("supersample", 0, "supersample must be an integer >= 1"),
    ("background", (0, 0, 300), r"background must be three values in 0\.\.255"),
    ("background", (0, 0), r"background must be three values in 0\.\.255"),
    ("video_frames", 24, "video_frames must be at most 16, twice the 8 frames a model samples"),
    ("video_frames", 5, "video_frames must be at least 6"),
])
def test_bad_video_and_seed_settings_are_refused_naming_the_setting(setting, value, message):
    with pytest.raises(ValueError, match=message):
        sw.ShapesWorldConfig(**{setting: value})


def test_bad_video_settings_are_usage_errors_before_anything_is_written(tmp_path, capsys):
    from fusion.cli import main as fusion_cli

    for option, value, message in (("--video-fps", "0", "video-fps must be a number > 0"),
                                   ("--video-fps", "-4", "video-fps must be a number > 0"),
                                   ("--video-crf", "99", "video-crf must be an integer in 0..51"),
                                   ("--seed", "-1", "seed must be an integer >= 0"),
                                   ("--video-frames", "32", "video-frames must be at most 16")):
        with pytest.raises(SystemExit) as exited:
            fusion_cli(["shapes-world", str(tmp_path / "cli"), option, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / "cli").exists()


def test_longest_allowed_clips_keep_every_event_between_two_sampled_frames():
    """With the frames a model samples by default, an event (2..frames-2) has a sampled frame before and
    one from it on, and two events >= 2 frames apart (a "first" question) a sampled frame between them."""
    from fusion.processor import VideoSettings
    from vision.video import frame_indices

    assert sw.MODEL_SAMPLED_FRAMES == VideoSettings().num_frames
    sw.ShapesWorldConfig(video_frames=sw.MAX_VIDEO_FRAMES)  # accepted

    def every_event_seen(frames):
        sampled = frame_indices(frames, 4.0, num_frames=sw.MODEL_SAMPLED_FRAMES)
        low, high = sw._event_window(frames)
        single = all(any(s < f for s in sampled) and any(s >= f for s in sampled) for f in range(low, high + 1))
        pairs = all(any(a <= s < b for s in sampled) for a in range(low, high + 1) for b in range(a + 2, high + 1))
        return single and pairs

    assert all(every_event_seen(n) for n in range(6, sw.MAX_VIDEO_FRAMES + 1))
    assert not every_event_seen(24) and not every_event_seen(32)  # what the bound keeps out


def test_video_docs_say_only_direction_strictly_needs_the_frames_in_order(world):
    """The documentation claims what the data shows: "first" questions and many appeared/disappeared ones
    can be answered from which frames show which object, without the frames' order."""
    docs = " ".join((sw.__doc__ + sw.video_questions.__doc__).split())
    assert "can only be answered by looking at the frames in order" not in docs
    assert "Each needs the frames in order" not in docs
    assert "Only direction questions" in docs and "without their order" in docs
    root, _, _ = world
    videos = [s for split in sw.SPLITS for s in read_split(root, split) if s["task"] == "video-qa"]
    one_changer = first = 0
    for s in videos:
        objects = {sw.object_name(o): o for o in s["meta"]["objects"]}
        if s["type"] in ("appeared", "disappeared"):
            one_changer += sum(o["event"] in ("appear", "disappear") for o in objects.values()) == 1
        if s["type"] != "first":
            continue
        first += 1
        # the unordered set of frames: which objects each shows
        shown = {frozenset(n for n, o in objects.items() if o["track"][f] is not None)
                 for f in range(s["meta"]["frames"])}
        m = re.search(r"the (\w+ \w+) (appears|disappears) or the (\w+ \w+) (appears|disappears)\?",
                      s["conversations"][0]["content"])
        x, x_event, y, y_event = m.groups()

        def happened(frame, name, event):
            return (name in frame) == (event == "appears")

        answer = x if any(happened(f, x, x_event) and not happened(f, y, y_event) for f in shown) else y
        assert answer == s["conversations"][1]["content"]
    assert first and one_changer


def _publish_script():
    spec = importlib.util.spec_from_file_location("publish_default_model",
                                                  ROOT / "examples" / "recipes" / "publish_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_card_says_how_many_test_images_repeat_a_training_layout(tmp_path):
    publish = _publish_script()

    def image(path, *objects):
        return {"images": [path], "videos": [], "task": "vqa", "meta": {"objects": list(objects)}}

    def obj(shape, color, row, col, center=(10.0, 10.0)):
        return {"shape": shape, "color": color, "row": row, "col": col, "center": list(center), "radius": 7.0}

    red_circle, blue_square = obj("circle", "red", 0, 0), obj("square", "blue", 2, 1)
    clip = {"images": [], "videos": ["videos/train/000000.mp4"], "task": "video-qa",
            "meta": {"objects": [{"shape": "circle", "color": "red", "track": [[1.0, 2.0]]}]}}
    train = [image("images/train/000000.png", red_circle, blue_square), clip]
    extra = [image("images/train_extra/000000.png", obj("triangle", "green", 1, 1, (30.0, 31.0)))]
    test = [image("images/test/000000.png", red_circle, blue_square),  # drawn exactly as a training image
            image("images/test/000001.png", obj("triangle", "green", 1, 1, (32.0, 30.0))),  # layout of an extra
            image("images/test/000002.png", obj("triangle", "green", 1, 2)),  # a new layout
            {**clip, "videos": ["videos/test/000000.mp4"]}]
    for name, rows in (("train", train), ("train_extra", extra), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overlap = publish.training_overlap(tmp_path)
    assert overlap == {"train_images": 2, "test_images": 3, "test_videos": 1, "same_images": 1, "same_videos": 1,
                       "same_layout": 2}
    note = " ".join(publish.overlap_note(overlap).split())
    assert "1 of the 3 test images and 1 of the 1 test clips are drawn exactly as a training one is" in note
    assert "2 of the 3 test images show the same shapes and colours in the same cells" in note
    assert " ".join(publish.overlap_note({**overlap, "same_images": 0, "same_videos": 0}).split()).startswith(
        "No test image or clip is drawn exactly as a training one is")
    card = " ".join((ROOT / "fusion" / "default_model" / "MODEL_CARD.md").read_text().split())
    assert "never seen in training" not in card
    assert re.search(r"\d+ of the \d+ test images show the same shapes and colours in the same cells as one of "
                     r"the \d+ training images", card)


def test_notebook_settings_quote_the_committed_finetune_notebook():
    """The comment on the fine-tuning settings quotes the committed notebook's outputs, forgetting included."""
    notebook = json.loads((ROOT / "examples" / "finetune_custom_data.ipynb").read_text())
    outputs = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                        for cell in notebook["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", []))

    def before_after(row):
        m = re.search(rf"^{row}\s+([\d.]+)\s+([\d.]+)$", outputs, flags=re.M)
        return float(m[1]), float(m[2])

    settings = " ".join((ROOT / "examples" / "notebook_settings.py").read_text().replace("#", " ").split())
    vqa, shape, cider = before_after("VQA accuracy"), before_after("shape"), before_after("caption CIDEr")
    assert f"test VQA accuracy {vqa[0]:.3f} -> {vqa[1]:.3f}" in settings
    assert f"(stars) {shape[0]:.3f} -> {shape[1]:.3f}" in settings
    assert f"CIDEr {cider[0]:.2f} -> {cider[1]:.2f}" in settings
    media = re.search(r"before: (\d+) of (\d+) sample-media.*\nafter: (\d+) of \d+", outputs)
    assert f"from {media[1]} of {media[2]} right to {media[3]} of {media[2]}" in settings
    if media[3] != media[1]:
        assert "stay at" not in settings


def test_help_says_to_put_out_dir_before_a_bare_train_extra_balanced(capsys):
    with pytest.raises(SystemExit):
        sw.main(["--help"], prog="fusion shapes-world")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "put OUT_DIR before this option" in help_text
    assert "fusion shapes-world OUT_DIR --train-extra-balanced" in help_text
    assert "--train-images TRAIN_IMAGES default: 4000" in help_text  # what a bare command writes


def test_command_line_refuses_another_worlds_folder_and_overwrite_leaves_nothing_of_it(tmp_path, capsys):
    """`fusion shapes-world` into a folder holding a world of other settings (e.g. the recipe's) is refused
    unless --overwrite; regenerating removes the earlier world's files (its extras too), not the user's."""
    small = ["--train-images", "4", "--val-images", "1", "--test-images", "1", "--train-videos", "1",
             "--val-videos", "1", "--test-videos", "1", "--text-samples", "5"]
    out = tmp_path / "cli"
    sw.main([str(out), *small, "--train-extra-questions", "relation=2"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        sw.main([str(out), *small, "--text-samples", "6"])
    assert exited.value.code == 2
    assert "holds a shapes world written with other settings" in capsys.readouterr().err
    assert (out / "train_extra.jsonl").exists()  # untouched
    # only the extra-sample options differ: that file is rewritten, nothing else is drawn again
    drawn = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    sw.main([str(out), *small, "--train-extra-questions", "position=1"])
    assert "rewrote the extra training samples of" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == drawn
    assert {json.loads(line)["type"] for line in (out / "train_extra.jsonl").read_text().splitlines()} == {"position"}
    sw.main([str(out), *small, "--text-samples", "6", "--overwrite"])
    assert not (out / "train_extra.jsonl").exists() and not (out / "images" / sw.OFFGRID_FOLDER).exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "train.jsonl").exists()
    sw.main([str(out), *small, "--text-samples", "6"])  # the same settings again: no --overwrite needed
