"""The shapes world: a synthetic, deterministic multimodal dataset that a tiny model can learn on a CPU.

Images show 1 to `max_shapes` shapes of pure colours on a plain background, one shape per cell of a
3x3 grid (a little jitter and size variation, never touching), so every question has one clear answer.
`train_jitter` lets the shapes of training images stray further from their cell's centre (never out of
it), so that the encoder also learns shapes that straddle its patches, as the shapes of videos do.
`train_extra_questions` asks training images more questions of the named types (e.g. every relation
question a scene has), since some types need many more examples than one per image to be learned; they go
to their own file, `train_extra.jsonl`, so that a recipe chooses the stages that see them;
`train_extra_balanced` keeps their answers even (a scene's relation questions are mostly "no").
`train_extra_offgrid_images` adds that many more training images to `train_extra.jsonl`, each with the usual
questions and caption, whose shapes sit anywhere in their cells (as `train_jitter=1` places them): off-grid
shapes for the stages that see that file only, while the other stages keep the centred ones.
`train_video_captions` gives each training video a caption sample too (its events in order, naming each
shape), so that the encoder sees many more shapes named where they sit off the grid.
Videos show 1 or 2 shapes that move, appear or disappear. Only direction questions ("Which way does the
red circle move?") strictly need the frames in order. "appeared", "disappeared" and "first" questions are
asked about clips whose events happen mid-clip (at least 2 frames before and after each), but many of them
can be answered from which frames show which object, without their order: in more than half of the appeared
and disappeared questions only one object ever changes visibility, and a "first" question names each
object's event, so a frame where one event has happened and the other not yet (e.g. of two appearing
objects, the one shown alone; by counting, the one shown in more frames) answers it. A text-only corpus
renders the same world as plain chat for training a language trunk from nothing.

Layout written by `generate_shapes_world(out_dir, config)`::

    out_dir/
      world.json                      the generator settings, palette, question types and answer vocabularies
      train.jsonl val.jsonl test.jsonl one sample per line (below); splits never share an image or a video
      train_extra.jsonl               with `train_extra_questions`: more questions about the train images;
                                      with `train_extra_offgrid_images`: those images' samples
      text.jsonl                      the text-only corpus (no images, no videos)
      images/{split}/000123.png
      images/train_extra/000123.png   the off-grid images (`train_extra_offgrid_images`)
      videos/{split}/000007.mp4

A sample (paths are relative to `out_dir`)::

    {"id": "train-img000123-q0", "images": ["images/train/000123.png"], "videos": [],
     "conversations": [{"role": "user", "content": "<image>\\nWhat color is the circle?"},
                       {"role": "assistant", "content": "red"}],
     "type": "color", "task": "vqa", "meta": {...the scene...}}

`task` is "vqa", "caption", "video-qa" or "text"; `type` is the question type (see `QUESTION_TYPES`).
Answers are lowercase, one or two words; counts are digits ("0" ... "3").

Everything is deterministic from `config.seed`: the same seed gives byte-identical JSONL files and
identical pixels. Command line: ``python -m fusion.data.shapes_world OUT_DIR --seed 0 --train-images 4000``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from vision.checks import is_finite_number, is_whole_number

FORMAT_VERSION = 1

# Pure, well separated colours; interiors keep these exact values in the PNGs.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 210, 0),
    "blue": (40, 80, 255),
    "yellow": (255, 255, 0),
    "purple": (150, 0, 220),
    "orange": (255, 140, 0),
    "cyan": (0, 230, 230),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "pink": (255, 150, 190),
    "brown": (140, 80, 20),
    "gray": (128, 128, 128),
}
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")

GRID = 3  # images are a 3x3 grid of cells; the position words below name them
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "center", "right")


def position_name(row: int, col: int) -> str:
    """The word(s) for a grid cell: "top left", "top center", ..., "center" (the middle cell), ..."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROW_NAMES[row]} {COLUMN_NAMES[col]}"


POSITION_NAMES: tuple[str, ...] = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
IMAGE_QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "existence", "relation")
VIDEO_QUESTION_TYPES: tuple[str, ...] = ("direction", "appeared", "disappeared", "first")
QUESTION_TYPES: tuple[str, ...] = IMAGE_QUESTION_TYPES + ("caption",) + VIDEO_QUESTION_TYPES
SPLITS: tuple[str, ...] = ("train", "val", "test")
CAPTION_PROMPT = "Describe the image."
VIDEO_CAPTION_PROMPT = "Describe the video."
TEXT_CAPTION_PROMPT = "Describe a scene with shapes."


# A model samples this many frames from a clip by default (`fusion.processor.VideoSettings.num_frames`);
# clips of at most twice as many frames keep every event between two sampled frames (see `video_frames`).
MODEL_SAMPLED_FRAMES = 8
MAX_VIDEO_FRAMES = 2 * MODEL_SAMPLED_FRAMES


@dataclass
class ShapesWorldConfig:
    """Everything that decides a shapes-world dataset. Same config (seed included) → same bytes.

    `shapes` may use any of `SHAPE_NAMES`, `colors` any of `COLOR_RGB`: extending them (e.g. a "star"
    or "purple") gives data a default model has never seen; `focus` then makes every image and video
    contain at least one object with one of the named shapes or colours (see `new_concept_config`).

    `train_extra_questions` maps an image question type to how many more questions of that type each
    training image asks, beyond the `questions_per_image` ones (distinct questions, answers balanced; fewer
    where the scene has fewer: a 2-shape scene has 8 relation questions, a 3-shape scene 24). They are
    written to `train_extra.jsonl`, image by image (so `group_by_media` shares each image between them), from
    their own random stream: `train.jsonl`, `val.jsonl` and `test.jsonl` are byte-identical to those of the
    same world without them. Asking for every question of a type follows the scenes' answers, which are not
    even (most relation questions of a scene are answered "no": ~63% of them); `train_extra_balanced` adds a
    question only while its answer is among the type's least used so far, over all training images, so the
    answers stay even (relation: half "yes", at the cost of fewer questions). It is `True` (every type it
    names) or a list of types, e.g. `["relation"]`: a type whose answers are even anyway (position: a shape is
    as likely in any cell) then keeps all its questions instead of about one per image.
    """

    image_size: int = 64
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colors: tuple[str, ...] = DEFAULT_COLORS
    max_shapes: int = 3
    train_images: int = 4000
    val_images: int = 200
    test_images: int = 500
    questions_per_image: int = 6       # one of each image question type by default
    captions: bool = True              # one caption sample per image as well
    train_videos: int = 1000
    val_videos: int = 100
    test_videos: int = 200
    questions_per_video: int = 2
    video_size: int = 64
    video_frames: int = 8              # 6..16 (events need frames around them; a model samples 8 by default)
    video_fps: float = 4.0             # > 0
    video_crf: int = 12                # 0..51, low, so the colours survive compression
    text_samples: int = 10000
    focus: tuple[str, ...] = ()
    background: tuple[int, int, int] = (0, 0, 0)
    supersample: int = 4               # antialiasing: draw this many times larger, then box-downsample (>= 1)
    train_jitter: float = 0.0          # train images only: 0..1, how far from its cell's centre a shape may sit
    train_extra_questions: dict[str, int] = dataclasses.field(default_factory=dict)  # train images only, see above
    train_extra_balanced: bool | list[str] = False  # extra questions keep answers even: all types or those named
    train_extra_offgrid_images: int = 0  # more training images, shapes anywhere in their cells, see above
    train_video_captions: bool = False  # train videos only: also a caption sample ("Describe the video.")
    seed: int = 0                      # >= 0

    def __post_init__(self):
        self.shapes = tuple(self.shapes)
        self.colors = tuple(self.colors)
        self.focus = tuple(self.focus)
        self.background = tuple(int(v) for v in self.background)
        unknown_shapes = [s for s in self.shapes if s not in SHAPE_NAMES]
        if unknown_shapes:
            raise ValueError(f"ShapesWorldConfig: unknown shapes {unknown_shapes}; choose from {list(SHAPE_NAMES)}")
        unknown_colors = [c for c in self.colors if c not in COLOR_RGB]
        if unknown_colors:
            raise ValueError(f"ShapesWorldConfig: unknown colors {unknown_colors}; choose from {list(COLOR_RGB)}")
        if len(set(self.shapes)) != len(self.shapes) or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"ShapesWorldConfig: shapes and colors must not repeat, got {self.shapes} {self.colors}")
        unknown_focus = [f for f in self.focus if f not in self.shapes and f not in self.colors]
        if unknown_focus:
            raise ValueError(f"ShapesWorldConfig: focus {unknown_focus} must be among shapes {self.shapes} "
                             f"or colors {self.colors}")
        if not 1 <= self.max_shapes <= GRID * GRID:
            raise ValueError(f"ShapesWorldConfig: max_shapes must be 1..{GRID * GRID}, got {self.max_shapes}")
        if len(self.shapes) * len(self.colors) < max(self.max_shapes, 2):
            raise ValueError("ShapesWorldConfig: need at least max(max_shapes, 2) distinct (color, shape) pairs, "
                             f"got {len(self.shapes)} shapes x {len(self.colors)} colors")
        self.train_extra_questions = {str(k): v for k, v in sorted(dict(self.train_extra_questions).items())}
        for qtype, n in self.train_extra_questions.items():
            if qtype not in IMAGE_QUESTION_TYPES:
                raise ValueError(f"ShapesWorldConfig: train_extra_questions names {qtype!r}, which is not an image "
                                 f"question type; choose from {list(IMAGE_QUESTION_TYPES)}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"ShapesWorldConfig: train_extra_questions[{qtype!r}] must be an integer >= 0, "
                                 f"got {n!r}")
        if not isinstance(self.train_extra_balanced, bool):
            balanced = self.train_extra_balanced
            if isinstance(balanced, str) or not all(isinstance(t, str) for t in balanced):
                raise ValueError(f"ShapesWorldConfig: train_extra_balanced must be true, false or a list of question "
                                 f"types, got {balanced!r}")
            self.train_extra_balanced = sorted(set(balanced))
            unknown = [t for t in self.train_extra_balanced if t not in self.train_extra_questions]
            if unknown:
                raise ValueError(f"ShapesWorldConfig: train_extra_balanced names {unknown}, which "
                                 f"train_extra_questions does not ask; it asks {list(self.train_extra_questions)}")
        if not 0.0 <= self.train_jitter <= 1.0:
            raise ValueError(f"ShapesWorldConfig: train_jitter must be in 0..1, got {self.train_jitter}")
        if self.image_size < 24:
            raise ValueError(f"ShapesWorldConfig: image_size must be at least 24, got {self.image_size}")
        if self.video_size < 24 or self.video_size % 2:
            raise ValueError(f"ShapesWorldConfig: video_size must be even and at least 24, got {self.video_size}")
        if self.video_frames < 6:
            raise ValueError(f"ShapesWorldConfig: video_frames must be at least 6 (events need frames before "
                             f"and after them), got {self.video_frames}")
        if self.video_frames > MAX_VIDEO_FRAMES:
            raise ValueError(f"ShapesWorldConfig: video_frames must be at most {MAX_VIDEO_FRAMES}, twice the "
                             f"{MODEL_SAMPLED_FRAMES} frames a model samples from a clip by default: in a longer "
                             f"clip two events can fall between the same two sampled frames, so their order "
                             f"(the answer to a \"first\" question) is not visible to the model; got "
                             f"{self.video_frames}")
        if not is_finite_number(self.video_fps) or self.video_fps < 0.001:
            raise ValueError(f"ShapesWorldConfig: video_fps must be a number > 0 (at least 0.001: an mp4 stores "
                             f"its frame rate as a fraction whose denominator is at most 1000), "
                             f"got {self.video_fps!r}")
        if not is_whole_number(self.video_crf) or not 0 <= self.video_crf <= 51:
            raise ValueError(f"ShapesWorldConfig: video_crf must be an integer in 0..51 (the x264 quality scale, "
                             f"lower is closer to lossless), got {self.video_crf!r}")
        if not is_whole_number(self.seed) or self.seed < 0:
            raise ValueError(f"ShapesWorldConfig: seed must be an integer >= 0, got {self.seed!r}")
        if not is_whole_number(self.supersample) or self.supersample < 1:
            raise ValueError(f"ShapesWorldConfig: supersample must be an integer >= 1, got {self.supersample!r}")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ValueError(f"ShapesWorldConfig: background must be three values in 0..255 (red, green, blue), "
                             f"got {self.background}")
        for name in ("train_images", "val_images", "test_images", "train_videos", "val_videos", "test_videos",
                     "text_samples", "questions_per_image", "questions_per_video", "train_extra_offgrid_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesWorldConfig: {name} must be >= 0, got {getattr(self, name)}")

    def has_train_extra(self) -> bool:
        """Whether the world has a `train_extra.jsonl` (extra questions or off-grid images)."""
        return bool(self.train_extra_questions) or self.train_extra_offgrid_images > 0

    def balances(self, qtype: str) -> bool:
        """Whether `train_extra_balanced` keeps the extra answers of `qtype` even."""
        if isinstance(self.train_extra_balanced, bool):
            return self.train_extra_balanced
        return qtype in self.train_extra_balanced

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def split_sizes(self, split: str) -> tuple[int, int]:
        """(number of images, number of videos) in `split`."""
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_videos")


def new_concept_config(new_shapes=(), new_colors=(), base: ShapesWorldConfig | None = None,
                       **overrides) -> ShapesWorldConfig:
    """A config whose world adds shapes and/or colours (e.g. "star", "purple") to `base`'s, with every
    image and video showing at least one of them: data for teaching a trained model a new concept.

    >>> cfg = new_concept_config(new_shapes=["star"], new_colors=["purple"], seed=1, train_images=500)
    """
    base = base or ShapesWorldConfig()
    shapes = tuple(base.shapes) + tuple(s for s in new_shapes if s not in base.shapes)
    colors = tuple(base.colors) + tuple(c for c in new_colors if c not in base.colors)
    focus = tuple(new_shapes) + tuple(new_colors)
    return dataclasses.replace(base, shapes=shapes, colors=colors, focus=focus, **overrides)


# ----------------------------------------------------------------------------------------------------
# Drawing


def shape_outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` centred at (cx, cy), inside the box of half-size `radius`.

    (The circle is drawn as an ellipse, not a polygon.) Every shape contains its centre point.
    """
    r = radius
    if shape == "square":
        h = 0.85 * r  # a square of the same half-size would look much bigger than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            rk = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rk * math.cos(angle), cy + rk * math.sin(angle)))
        return points
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 6 + k * math.pi / 3), cy + r * math.sin(math.pi / 6 + k * math.pi / 3))
                for k in range(6)]
    raise ValueError(f"shape_outline: unknown shape {shape!r}; choose from {list(SHAPE_NAMES)}")


def render_shapes(objects: list[dict], size: int, background=(0, 0, 0), supersample: int = 4) -> np.ndarray:
    """Draw `objects` (dicts with shape, color, center [x, y] in pixels, radius) → uint8 [size, size, 3]."""
    scale = max(1, int(supersample))
    canvas = Image.new("RGB", (size * scale, size * scale), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy = obj["center"]
        fill = COLOR_RGB[obj["color"]]
        # pixel (i, j) covers [i, i+1) x [j, j+1); in the big canvas that is [i*scale, (i+1)*scale)
        if obj["shape"] == "circle":
            r = obj["radius"] * scale
            draw.ellipse([cx * scale - r, cy * scale - r, cx * scale + r, cy * scale + r], fill=fill)
        else:
            outline = shape_outline(obj["shape"], cx * scale, cy * scale, obj["radius"] * scale)
            draw.polygon(outline, fill=fill)
    if scale > 1:
        canvas = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Small language helpers


def with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(shape: str) -> str:
    return shape + "s"


def object_name(obj: dict) -> str:
    """The canonical name of an object, also the answer format: "red circle"."""
    return f"{obj['color']} {obj['shape']}"


def caption_for(objects: list[dict]) -> str:
    """The canonical caption: every shape in reading order, e.g.
    "a red circle at the top left, a green triangle at the center and a blue square at the bottom right."
    """
    parts = [f"{with_article(object_name(o))} at the {o['position']}"
             for o in sorted(objects, key=lambda o: (o["row"], o["col"]))]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


# ----------------------------------------------------------------------------------------------------
# Questions and answer balance


class Question(NamedTuple):
    type: str        # question type, e.g. "color"
    template: str    # which phrasing, e.g. "color_of_shape"
    text: str        # the question as the user asks it
    answer: str      # the canonical answer


class AnswerBalancer:
    """Chooses questions so that, within each question type, answers come out close to uniform.

    Greedy: among the candidate questions, pick the answer used least so far for that type, then the
    phrasing used least with that answer, then one at random. Ties break with the caller's RNG.
    """

    def __init__(self):
        self.answer_counts: Counter = Counter()
        self.template_counts: Counter = Counter()

    def least_used(self, qtype: str, answers, rng: np.random.Generator) -> str:
        answers = sorted(set(answers))
        fewest = min(self.answer_counts[(qtype, a)] for a in answers)
        tied = [a for a in answers if self.answer_counts[(qtype, a)] == fewest]
        return tied[int(rng.integers(len(tied)))]

    def pick(self, candidates: list[Question], rng: np.random.Generator, answer: str | None = None) -> Question:
        qtype = candidates[0].type
        if answer is None:
            answer = self.least_used(qtype, [c.answer for c in candidates], rng)
        pool = [c for c in candidates if c.answer == answer]
        fewest = min(self.template_counts[(qtype, c.template, answer)] for c in pool)
        pool = [c for c in pool if self.template_counts[(qtype, c.template, answer)] == fewest]
        chosen = pool[int(rng.integers(len(pool)))]
        self.answer_counts[(qtype, answer)] += 1
        self.template_counts[(qtype, chosen.template, answer)] += 1
        return chosen


def image_questions(objects: list[dict], config: ShapesWorldConfig, qtype: str) -> list[Question]:
    """Every unambiguous question of type `qtype` about the scene `objects`, with its answer."""
    out: list[Question] = []
    by_shape = {s: [o for o in objects if o["shape"] == s] for s in config.shapes}
    by_color = {c: [o for o in objects if o["color"] == c] for c in config.colors}
    if qtype == "color":
        for shape, objs in by_shape.items():
            if len(objs) == 1:
                out.append(Question("color", "color_of_shape", f"What color is the {shape}?", objs[0]["color"]))
        for o in objects:
            out.append(Question("color", "color_at_position", f"What color is the shape at the {o['position']}?",
                                o["color"]))
    elif qtype == "shape":
        for color, objs in by_color.items():
            if len(objs) == 1:
                out.append(Question("shape", "shape_of_color", f"What shape is the {color} object?", objs[0]["shape"]))
        for o in objects:
            out.append(Question("shape", "shape_at_position", f"What shape is at the {o['position']}?", o["shape"]))
    elif qtype == "count":
        for shape, objs in by_shape.items():
            out.append(Question("count", "count_shape", f"How many {plural(shape)} are there?", str(len(objs))))
        for color, objs in by_color.items():
            out.append(Question("count", "count_color", f"How many {color} shapes are there?", str(len(objs))))
        out.append(Question("count", "count_all", "How many shapes are there?", str(len(objects))))
    elif qtype == "position":
        for o in objects:
            out.append(Question("position", "position_of_object", f"Where is the {object_name(o)}?", o["position"]))
        for shape, objs in by_shape.items():
            if len(objs) == 1:
                out.append(Question("position", "position_of_shape", f"Where is the {shape}?", objs[0]["position"]))
        for color, objs in by_color.items():
            if len(objs) == 1:
                out.append(Question("position", "position_of_color", f"Where is the {color} object?",
                                    objs[0]["position"]))
    elif qtype == "existence":
        present = {(o["color"], o["shape"]) for o in objects}
        for shape in config.shapes:
            for color in config.colors:
                out.append(Question("existence", "exists_object", f"Is there {with_article(color)} {shape}?",
                                    "yes" if (color, shape) in present else "no"))
        for shape, objs in by_shape.items():
            out.append(Question("existence", "exists_shape", f"Is there {with_article(shape)}?",
                                "yes" if objs else "no"))
        for color, objs in by_color.items():
            out.append(Question("existence", "exists_color", f"Is there {with_article(color)} shape?",
                                "yes" if objs else "no"))
    elif qtype == "relation":
        for a in objects:
            for b in objects:
                if a is b:
                    continue
                holds = {"left of": a["col"] < b["col"], "right of": a["col"] > b["col"],
                         "above": a["row"] < b["row"], "below": a["row"] > b["row"]}
                for relation, truth in holds.items():
                    out.append(Question("relation", relation.replace(" ", "_"),
                                        f"Is the {object_name(a)} {relation} the {object_name(b)}?",
                                        "yes" if truth else "no"))
    else:
        raise ValueError(f"image_questions: unknown question type {qtype!r}; choose from {list(IMAGE_QUESTION_TYPES)}")
    return out


def answer_vocabulary(config: ShapesWorldConfig) -> dict[str, list[str]]:
    """Every answer each question type can have (captions are free text and not listed)."""
    names = [f"{c} {s}" for c in config.colors for s in config.shapes]
    return {
        "color": list(config.colors),
        "shape": list(config.shapes),
        "count": [str(n) for n in range(config.max_shapes + 1)],
        "position": list(POSITION_NAMES),
        "existence": ["yes", "no"],
        "relation": ["yes", "no"],
        "direction": list(DIRECTIONS),
        "appeared": names,
        "disappeared": names,
        "first": names,
    }


# ----------------------------------------------------------------------------------------------------
# Image scenes


def focus_pairs(config: ShapesWorldConfig) -> list[tuple[str, str]]:
    """(color, shape) pairs with a focus concept, or all pairs when there is no focus."""
    pairs = [(c, s) for c in config.colors for s in config.shapes]
    if config.focus:
        pairs = [(c, s) for c, s in pairs if c in config.focus or s in config.focus]
    return pairs


def sample_image_scene(rng: np.random.Generator, config: ShapesWorldConfig, jitter: float = 0.0) -> list[dict]:
    """1..max_shapes objects, each in its own grid cell, no two with the same colour and shape.

    Shapes and colours repeat on purpose now and then (so counts of 2 and 3 are common enough to
    balance). With `jitter` 0 a shape stays inside its cell with a margin, so shapes never overlap or
    touch. A `jitter` j > 0 lets a shape's centre sit up to j x (half a cell - 1.5 px) from its cell's
    centre, so the shape may reach into the next cell (as the shapes of videos do: they sit anywhere);
    the centre stays in its cell, which names its position, shapes stay inside the image and still
    never overlap.
    """
    n = int(rng.integers(1, config.max_shapes + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    cell = config.image_size / GRID
    used: set[tuple[str, str]] = set()
    objects = []
    for k, index in enumerate(cells):
        if k == 0 and config.focus:
            choices = [p for p in focus_pairs(config) if p not in used]
            color, shape = choices[int(rng.integers(len(choices)))]
        else:
            while True:
                if objects and rng.random() < 0.35:  # reuse a shape already in the scene
                    shape = objects[int(rng.integers(len(objects)))]["shape"]
                else:
                    shape = config.shapes[int(rng.integers(len(config.shapes)))]
                if objects and rng.random() < 0.25:  # reuse a colour already in the scene
                    color = objects[int(rng.integers(len(objects)))]["color"]
                else:
                    color = config.colors[int(rng.integers(len(config.colors)))]
                if (color, shape) not in used:
                    break
        used.add((color, shape))
        row, col = divmod(int(index), GRID)
        radius = cell * float(rng.uniform(0.32, 0.42))
        cx, cy = _center_near(rng, row, col, cell, _inside_room(cell, radius)) if not jitter else (0.0, 0.0)
        objects.append({"shape": shape, "color": color, "row": row, "col": col,
                        "position": position_name(row, col),
                        "center": [round(cx, 2), round(cy, 2)], "radius": round(radius, 2)})
    if jitter:
        _place_jittered(objects, rng, config, jitter)
    objects.sort(key=lambda o: (o["row"], o["col"]))
    return objects


def scene_layout(objects: list[dict]) -> frozenset:
    """What an image's scene shows, as far as its questions and caption can tell: the set of (shape, colour, row,
    column) of its objects (`meta["objects"]` of its samples). The world is small, so a test image may show the
    layout of a training image, drawn a little differently (sizes and offsets in the cells)."""
    return frozenset((o["shape"], o["color"], o["row"], o["col"]) for o in objects)


def _inside_room(cell: float, radius: float) -> float:
    """How far a shape's centre may move from its cell's centre and keep a 1.5 px margin to the cell's edges."""
    return max(0.0, cell / 2 - radius - 1.5)


def _center_near(rng: np.random.Generator, row: int, col: int, cell: float, room: float) -> tuple[float, float]:
    """A centre drawn uniformly within `room` of cell (row, col)'s centre, x first."""
    cx = (col + 0.5) * cell + float(rng.uniform(-room, room))
    cy = (row + 0.5) * cell + float(rng.uniform(-room, room))
    return cx, cy


def _place_jittered(objects: list[dict], rng: np.random.Generator, config: ShapesWorldConfig, jitter: float):
    """Centres up to jitter x (half a cell - 1.5 px) from their cells' centres, inside the image, no overlaps.

    The whole scene is redrawn until no two shapes overlap: a shape placed first may leave no room for the
    next one, but a fresh draw of all of them always can succeed (unjittered places are among the draws).
    """
    cell, size = config.image_size / GRID, config.image_size
    for _ in range(10_000):
        centers = []
        for o in objects:
            r = o["radius"]
            c = _center_near(rng, o["row"], o["col"], cell, max(_inside_room(cell, r), jitter * (cell / 2 - 1.5)))
            centers.append([min(max(v, r + 1.5), size - r - 1.5) for v in c])  # a clipped shape would be ambiguous
        if all(math.hypot(a[0] - b[0], a[1] - b[1]) > objects[i]["radius"] + objects[j]["radius"] + 1.5
               for i, a in enumerate(centers) for j, b in enumerate(centers) if i < j):
            for o, c in zip(objects, centers):
                o["center"] = [round(c[0], 2), round(c[1], 2)]
            return
    raise RuntimeError("shapes world: could not place a scene's shapes without overlap")  # never seen


def image_question_types_for(index: int, config: ShapesWorldConfig) -> list[str]:
    """The question types asked about image `index`: the types in turn, starting where the last image stopped."""
    n_types = len(IMAGE_QUESTION_TYPES)
    q = config.questions_per_image
    return [IMAGE_QUESTION_TYPES[(index * q + k) % n_types] for k in range(q)]


def choose_image_questions(objects, config, index, balancer, rng) -> list[Question]:
    """The questions asked about image `index`: one of each of its `image_question_types_for` types, all
    distinct (with `questions_per_image` > 6 a type comes back, and asks another of its questions; fewer
    where the scene has no other)."""
    chosen: list[Question] = []
    for qtype in image_question_types_for(index, config):
        asked = {q.text for q in chosen}  # up to 6 questions have 6 types, so nothing is left out then
        candidates = [q for q in image_questions(objects, config, qtype) if q.text not in asked]
        if candidates:  # e.g. no relation question with one shape
            chosen.append(balancer.pick(candidates, rng))
    return chosen


def choose_extra_questions(objects, config, asked: set[str], balancer, rng) -> list[Question]:
    """`config.train_extra_questions[type]` more questions of each named type about one training image:
    distinct, none of them among `asked` (the image's usual questions), fewer where the scene has fewer."""
    chosen: list[Question] = []
    for qtype, n in config.train_extra_questions.items():
        pool = [q for q in image_questions(objects, config, qtype) if q.text not in asked]
        balanced = config.balances(qtype)
        vocabulary = answer_vocabulary(config)[qtype] if balanced else ()
        for _ in range(n):
            allowed = pool
            if balanced:  # only questions whose answer is among the type's least used
                fewest = min(balancer.answer_counts[(qtype, a)] for a in vocabulary)
                allowed = [q for q in pool if balancer.answer_counts[(qtype, q.answer)] == fewest]
            if not allowed:
                break
            q = balancer.pick(allowed, rng)
            chosen.append(q)
            pool.remove(q)
    return chosen


OFFGRID_FOLDER = "train_extra"  # images/train_extra/: the off-grid training images


def train_extra_samples(out_dir: str, train_samples: list[dict], config: ShapesWorldConfig) -> list[dict]:
    """The samples of `train_extra.jsonl`: the extra questions about the train split's images, then the
    `train_extra_offgrid_images` off-grid images (drawn into `out_dir`) with their questions and captions.
    Each from its own random stream, so that every other file is byte-identical with or without them."""
    rng = np.random.default_rng([config.seed, SPLITS.index("train"), 3])
    offgrid = write_image_samples(out_dir, OFFGRID_FOLDER, config.train_extra_offgrid_images, config, rng, 1.0)
    return extra_question_samples(train_samples, config) + offgrid


def extra_question_samples(train_samples: list[dict], config: ShapesWorldConfig) -> list[dict]:
    """The samples of `train_extra.jsonl`: `choose_extra_questions` for each image of the train split,
    drawn from their own random stream so that `train.jsonl` is byte-identical with or without them."""
    rng = np.random.default_rng([config.seed, SPLITS.index("train"), 2])
    balancer = AnswerBalancer()
    by_image: dict[str, list[dict]] = {}
    for s in train_samples:
        if s["task"] in ("vqa", "caption") and s["images"]:
            by_image.setdefault(s["images"][0], []).append(s)
    out = []
    for path, rows in by_image.items():
        objects = rows[0]["meta"]["objects"]
        asked = {r["conversations"][0]["content"].split("\n", 1)[1] for r in rows}
        stem = rows[0]["id"].rsplit("-", 1)[0]  # train-img000123
        for k, q in enumerate(choose_extra_questions(objects, config, asked, balancer, rng)):
            out.append(chat_sample(f"{stem}-x{k}", [path], [], f"<image>\n{q.text}", q.answer, q.type, "vqa",
                                   {"objects": objects, "template": q.template}))
    return out


# ----------------------------------------------------------------------------------------------------
# Videos


def _event_window(frames: int) -> tuple[int, int]:
    """Frames an appear/disappear event may happen at: at least 2 frames before it and 2 after."""
    return 2, frames - 2


def sample_video(rng: np.random.Generator, config: ShapesWorldConfig, primary_type: str, target: str) -> dict:
    """A short clip of 1-2 shapes built so that a `primary_type` question has the answer `target`.

    Each object has one event: "move" (the whole clip, in `direction`), "appear" or "disappear" (at
    `frame`: appears = absent before it, present from it on; disappears = present before, absent from
    it on) or "static". With two objects, each keeps to its own half of the frame (top/bottom when
    something moves left/right, left/right halves when something moves up/down), so they never overlap.
    """
    frames, size = config.video_frames, config.video_size
    low, high = _event_window(frames)
    all_pairs = [(c, s) for c in config.colors for s in config.shapes]

    def other_pair(taken):
        choices = [p for p in all_pairs if p not in taken]
        return choices[int(rng.integers(len(choices)))]

    def parse_name(name):
        color, shape = name.split(" ", 1)
        return color, shape

    pairs = focus_pairs(config)
    events: list[dict] = []  # one per object: {"pair", "event", "direction", "frame"}
    if primary_type == "direction":
        events.append({"pair": pairs[int(rng.integers(len(pairs)))], "event": "move", "direction": target})
        if rng.random() < 0.5:
            kind = ["static", "appear", "disappear", "move"][int(rng.integers(4))]
            events.append({"event": kind})
    elif primary_type in ("appeared", "disappeared"):
        kind = "appear" if primary_type == "appeared" else "disappear"
        events.append({"pair": parse_name(target), "event": kind})
        if rng.random() < 0.5:
            others = ["static", "move", "disappear" if kind == "appear" else "appear"]
            events.append({"event": others[int(rng.integers(3))]})
    elif primary_type == "first":
        early = int(rng.integers(low, high - 1))           # leaves room for a later event >= 2 frames on
        late = int(rng.integers(early + 2, high + 1))
        kinds = ["appear", "disappear"]
        events.append({"pair": parse_name(target), "event": kinds[int(rng.integers(2))], "frame": early})
        events.append({"event": kinds[int(rng.integers(2))], "frame": late})
    else:
        raise ValueError(f"sample_video: unknown question type {primary_type!r}; "
                         f"choose from {list(VIDEO_QUESTION_TYPES)}")
    if len(events) == 2:
        events[1]["pair"] = other_pair({events[0]["pair"]})

    # Movers share one axis: left/right movers with objects in the top/bottom halves, or up/down movers
    # with objects in the left/right halves.
    movers = [e for e in events if e["event"] == "move"]
    if movers and "direction" in movers[0]:
        horizontal = movers[0]["direction"] in ("left", "right")
    else:
        horizontal = bool(rng.random() < 0.5)
    axis_directions = ("left", "right") if horizontal else ("up", "down")
    for e in movers:
        e.setdefault("direction", axis_directions[int(rng.integers(2))])
    for e in events:
        if e["event"] in ("appear", "disappear") and "frame" not in e:
            e["frame"] = int(rng.integers(low, high + 1))

    halves = [0, 1] if rng.random() < 0.5 else [1, 0]
    objects = []
    for k, e in enumerate(events):
        radius = size * float(rng.uniform(0.13, 0.16))
        margin = radius + 2
        # "along" is the motion axis (x if horizontal), "across" the other one
        if len(events) == 1:
            across = float(rng.uniform(margin, size - margin))
        else:
            half_lo = halves[k] * size / 2
            across = float(rng.uniform(half_lo + margin, half_lo + size / 2 - margin))
        if e["event"] == "move":
            sign = 1.0 if e["direction"] in ("right", "down") else -1.0
            start = size / 2 - sign * size / 4 + float(rng.uniform(-0.04, 0.04)) * size
            end = size / 2 + sign * size / 4 + float(rng.uniform(-0.04, 0.04)) * size
            start, end = (min(max(v, radius + 1), size - radius - 1) for v in (start, end))
            along = [start + (end - start) * f / (frames - 1) for f in range(frames)]
        else:
            along = [float(rng.uniform(margin, size - margin))] * frames
        track = []
        for f in range(frames):
            visible = not ((e["event"] == "appear" and f < e["frame"]) or (e["event"] == "disappear" and f >= e["frame"]))
            x, y = (along[f], across) if horizontal else (across, along[f])
            track.append([round(x, 2), round(y, 2)] if visible else None)
        color, shape = e["pair"]
        objects.append({"shape": shape, "color": color, "event": e["event"],
                        "direction": e.get("direction"), "frame": e.get("frame"),
                        "radius": round(radius, 2), "track": track})

    timeline = []
    for o in objects:
        name = object_name(o)
        if o["event"] == "move":
            timeline.append({"frame": 0, "object": name, "event": "moves", "direction": o["direction"]})
        elif o["event"] == "static":
            timeline.append({"frame": 0, "object": name, "event": "stays"})
        else:
            timeline.append({"frame": o["frame"], "object": name, "event": o["event"] + "s"})
    timeline.sort(key=lambda ev: (ev["frame"], ev["object"]))
    return {"frames": frames, "fps": config.video_fps, "size": size, "objects": objects, "events": timeline}


def video_questions(video: dict) -> list[Question]:
    """Every question the clip answers unambiguously, with its answer.

    Direction questions need the frames in order. Appeared, disappeared and first questions are about
    events mid-clip, but some can be answered from which frames show an object, without their order: an
    appeared/disappeared clip where only one object changes visibility, and a "first" question (it names
    each object's event; a frame where one has happened and the other not yet tells which came first).
    """
    objects = video["objects"]
    out: list[Question] = []
    for o in objects:
        if o["event"] == "move":
            out.append(Question("direction", "direction_of_object", f"Which way does the {object_name(o)} move?",
                                o["direction"]))
    for kind, qtype, text in (("appear", "appeared", "What appears?"), ("disappear", "disappeared", "What disappears?")):
        doers = [o for o in objects if o["event"] == kind]
        if len(doers) == 1:
            out.append(Question(qtype, qtype, text, object_name(doers[0])))
    timed = [o for o in objects if o["event"] in ("appear", "disappear")]
    if len(timed) == 2 and abs(timed[0]["frame"] - timed[1]["frame"]) >= 2:
        earlier = min(timed, key=lambda o: o["frame"])
        for first, second in (timed, timed[::-1]):
            text = (f"Which happens first: the {object_name(first)} {first['event']}s "
                    f"or the {object_name(second)} {second['event']}s?")
            template = "first_answer_mentioned_first" if first is earlier else "first_answer_mentioned_second"
            out.append(Question("first", template, text, object_name(earlier)))
    return out


def render_video(video: dict, config: ShapesWorldConfig) -> np.ndarray:
    """The clip's frames, uint8 [frames, size, size, 3]."""
    frames = []
    for f in range(video["frames"]):
        visible = [{"shape": o["shape"], "color": o["color"], "center": o["track"][f], "radius": o["radius"]}
                   for o in video["objects"] if o["track"][f] is not None]
        frames.append(render_shapes(visible, video["size"], config.background, config.supersample))
    return np.stack(frames)


def choose_video_questions(video: dict, primary: Question, config, balancer, rng) -> list[Question]:
    """The primary question, then extra ones (other questions the same clip answers), balanced; none with
    `questions_per_video` 0 (the clip is still drawn, so the other clips stay the same)."""
    if config.questions_per_video < 1:
        return []
    chosen = [primary]
    while len(chosen) < config.questions_per_video:
        asked = {q.text for q in chosen}
        candidates = [q for q in video_questions(video) if q.text not in asked]
        if not candidates:
            break
        types = sorted({q.type for q in candidates})
        qtype = types[int(rng.integers(len(types)))]
        chosen.append(balancer.pick([q for q in candidates if q.type == qtype], rng))
    return chosen


def plan_video(index: int, config: ShapesWorldConfig, balancer: AnswerBalancer, rng) -> tuple[dict, Question]:
    """Video `index`: its primary question type comes in turn, its answer is the least used so far."""
    qtype = VIDEO_QUESTION_TYPES[index % len(VIDEO_QUESTION_TYPES)]
    if qtype == "direction":
        vocabulary = list(DIRECTIONS)
    else:
        vocabulary = [f"{c} {s}" for c, s in focus_pairs(config)]
    target = balancer.least_used(qtype, vocabulary, rng)
    video = sample_video(rng, config, qtype, target)
    candidates = [q for q in video_questions(video) if q.type == qtype]
    primary = balancer.pick(candidates, rng, answer=target)
    return video, primary


# ----------------------------------------------------------------------------------------------------
# Samples and the text corpus


def chat_sample(sample_id, images, videos, user, assistant, qtype, task, meta=None) -> dict:
    sample = {"id": sample_id, "images": images, "videos": videos,
              "conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
              "type": qtype, "task": task}
    if meta is not None:
        sample["meta"] = meta
    return sample


def narrate_video(video: dict) -> str:
    """The clip's events as plain sentences in time order, e.g.
    "the red circle moves left. the blue square appears. then the green square disappears."
    """
    sentences, last_frame = [], None
    for ev in video["events"]:
        if ev["event"] == "moves":
            sentences.append(f"the {ev['object']} moves {ev['direction']}.")
        elif ev["event"] == "stays":
            sentences.append(f"the {ev['object']} stays still.")
        else:  # "then" only for an event strictly later than the one before
            later = last_frame is not None and ev["frame"] > last_frame
            sentences.append(("then " if later else "") + f"the {ev['object']} {ev['event']}.")
            last_frame = ev["frame"]
    return " ".join(sentences)


def text_corpus(config: ShapesWorldConfig) -> list[dict]:
    """The text-only corpus: the world's vocabulary and answer formats as plain chat.

    In turn: three scene questions ("{caption}\\n{question}" → answer), one caption ("Describe a scene
    with shapes." → caption), one clip question ("{narration}\\n{question}" → answer). Answers are
    balanced like the image and video questions.
    """
    rng = np.random.default_rng([config.seed, 3, 2])
    balancer = AnswerBalancer()
    samples = []
    image_index = video_index = 0
    # the types a scene of this world can be asked about: a relation needs two shapes
    qtypes = [t for t in IMAGE_QUESTION_TYPES if t != "relation" or config.max_shapes >= 2]
    for i in range(config.text_samples):
        kind = i % 5
        sample_id = f"text-{i:06d}"
        if kind in (0, 1, 2, 3):
            objects = sample_image_scene(rng, config)
            if kind == 3:
                samples.append(chat_sample(sample_id, [], [], TEXT_CAPTION_PROMPT, caption_for(objects), "caption",
                                           "text"))
                continue
            qtype = qtypes[image_index % len(qtypes)]
            image_index += 1
            candidates = image_questions(objects, config, qtype)
            while not candidates:  # a relation needs two shapes: draw another scene (max_shapes >= 2 here)
                objects = sample_image_scene(rng, config)
                candidates = image_questions(objects, config, qtype)
            caption = caption_for(objects)
            q = balancer.pick(candidates, rng)
            samples.append(chat_sample(sample_id, [], [], f"{caption}\n{q.text}", q.answer, q.type, "text"))
        else:
            video, q = plan_video(video_index, config, balancer, rng)
            video_index += 1
            samples.append(chat_sample(sample_id, [], [], f"{narrate_video(video)}\n{q.text}", q.answer, q.type,
                                       "text"))
    return samples


# ----------------------------------------------------------------------------------------------------
# Writing a dataset


def _write_jsonl(path: str, samples: list[dict]) -> None:
    """One sample per line, written under a temporary name and then renamed (a crash leaves no half file)."""
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False, separators=(", ", ": ")) + "\n")
    os.replace(path + ".tmp", path)


def _remove_world(out_dir: str) -> None:
    """Delete what `generate_shapes_world` writes, if `out_dir` holds a world (its `world.json`); other files
    of the folder stay."""
    if not os.path.isfile(os.path.join(out_dir, "world.json")):
        return
    os.remove(os.path.join(out_dir, "world.json"))  # first: a half-removed world is no world
    for name in [f"{split}.jsonl" for split in SPLITS] + ["train_extra.jsonl", "text.jsonl"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    for folder in ("images", "videos"):
        shutil.rmtree(os.path.join(out_dir, folder), ignore_errors=True)


def world_settings_in(out_dir: str | os.PathLike) -> dict | None:
    """The settings of the world in `out_dir` (its `world.json`), or None where there is none."""
    path = os.path.join(os.fspath(out_dir), "world.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ShapesWorldConfig(**json.load(f)["config"]).to_dict()


def _write_world(out_dir: str, world: dict) -> None:
    """`world.json`, written under a temporary name and then renamed."""
    path = os.path.join(out_dir, "world.json")
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        json.dump(world, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_image_samples(out_dir: str, folder: str, n_images: int, config: ShapesWorldConfig,
                        rng: np.random.Generator, jitter: float) -> list[dict]:
    """Draw `n_images` scenes into `out_dir`/images/`folder`/ and return their samples: each image's
    questions (`choose_image_questions`, answers balanced within these images) and its caption."""
    samples: list[dict] = []
    balancer = AnswerBalancer()
    if n_images:
        os.makedirs(os.path.join(out_dir, "images", folder), exist_ok=True)
    for i in range(n_images):
        objects = sample_image_scene(rng, config, jitter)
        rel_path = f"images/{folder}/{i:06d}.png"
        pixels = render_shapes(objects, config.image_size, config.background, config.supersample)
        Image.fromarray(pixels).save(os.path.join(out_dir, rel_path))
        meta = {"objects": objects}
        for k, q in enumerate(choose_image_questions(objects, config, i, balancer, rng)):
            samples.append(chat_sample(f"{folder}-img{i:06d}-q{k}", [rel_path], [], f"<image>\n{q.text}", q.answer,
                                       q.type, "vqa", {**meta, "template": q.template}))
        if config.captions:
            samples.append(chat_sample(f"{folder}-img{i:06d}-caption", [rel_path], [], f"<image>\n{CAPTION_PROMPT}",
                                       caption_for(objects), "caption", "caption", meta))
    return samples


def generate_split(out_dir: str, split: str, config: ShapesWorldConfig) -> tuple[list[dict], int, int]:
    """Write the images and videos of `split` under `out_dir`; return (samples, n_images, n_videos)."""
    code = SPLITS.index(split)
    n_images, n_videos = config.split_sizes(split)
    jitter = config.train_jitter if split == "train" else 0.0
    samples = write_image_samples(out_dir, split, n_images, config, np.random.default_rng([config.seed, code, 0]),
                                  jitter)

    rng = np.random.default_rng([config.seed, code, 1])
    balancer = AnswerBalancer()
    if n_videos:
        from vision.video_io import write_video  # only video writing needs PyAV

        os.makedirs(os.path.join(out_dir, "videos", split), exist_ok=True)
    for i in range(n_videos):
        video, primary = plan_video(i, config, balancer, rng)
        rel_path = f"videos/{split}/{i:06d}.mp4"
        write_video(os.path.join(out_dir, rel_path), render_video(video, config), fps=config.video_fps,
                    crf=config.video_crf)
        for k, q in enumerate(choose_video_questions(video, primary, config, balancer, rng)):
            samples.append(chat_sample(f"{split}-vid{i:06d}-q{k}", [], [rel_path], f"<video>\n{q.text}", q.answer,
                                       q.type, "video-qa", {**video, "template": q.template}))
        if split == "train" and config.train_video_captions:  # draws nothing: the questions stay the same
            samples.append(chat_sample(f"{split}-vid{i:06d}-caption", [], [rel_path],
                                       f"<video>\n{VIDEO_CAPTION_PROMPT}", narrate_video(video), "caption",
                                       "caption", video))
    return samples, n_images, n_videos


def generate_shapes_world(out_dir: str | os.PathLike, config: ShapesWorldConfig | None = None) -> dict:
    """Write a shapes-world dataset to `out_dir` (see the module docstring for the layout).

    Returns the counts: {"train": {"images", "videos", "samples"}, "val": ..., "test": ...,
    "text": {"samples"}}.
    """
    config = config or ShapesWorldConfig()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _remove_world(out_dir)  # an earlier world's files: none of them (e.g. its extras) outlives it
    counts: dict = {}
    for split in SPLITS:
        samples, n_images, n_videos = generate_split(out_dir, split, config)
        _write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), samples)
        counts[split] = {"images": n_images, "videos": n_videos, "samples": len(samples)}
        if split == "train" and config.has_train_extra():
            extra = train_extra_samples(out_dir, samples, config)
            _write_jsonl(os.path.join(out_dir, "train_extra.jsonl"), extra)
            counts["train_extra"] = {"samples": len(extra)}
    corpus = text_corpus(config)
    _write_jsonl(os.path.join(out_dir, "text.jsonl"), corpus)
    counts["text"] = {"samples": len(corpus)}
    world = {
        "format_version": FORMAT_VERSION,
        "generator": "fusion.data.shapes_world",
        "config": config.to_dict(),
        "colors_rgb": {c: list(COLOR_RGB[c]) for c in config.colors},
        "position_names": list(POSITION_NAMES),
        "question_types": {"vqa": list(IMAGE_QUESTION_TYPES), "caption": ["caption"],
                           "video-qa": list(VIDEO_QUESTION_TYPES)},
        "answers": answer_vocabulary(config),
        "prompts": {"caption": CAPTION_PROMPT, "video_caption": VIDEO_CAPTION_PROMPT,
                    "text_caption": TEXT_CAPTION_PROMPT},
        "counts": counts,
    }
    _write_world(out_dir, world)
    return counts


# The settings that decide only `train_extra.jsonl` (and its off-grid images): changing them rewrites
# those, nothing else.
TRAIN_EXTRA_SETTINGS = ("train_extra_questions", "train_extra_balanced", "train_extra_offgrid_images")


def rewrite_train_extra(out_dir: str | os.PathLike, config: ShapesWorldConfig) -> dict:
    """Give the world in `out_dir` the extra samples of `config` (`TRAIN_EXTRA_SETTINGS`), redrawing
    nothing else.

    The extra samples depend only on `train.jsonl` and the config, so changing them rewrites
    `train_extra.jsonl` (or removes it), the off-grid images and `world.json`, and leaves every other
    image and video as it is. Any other difference between the world on disk and `config` is a
    ValueError. Returns the counts.
    """
    out_dir = os.fspath(out_dir)
    with open(os.path.join(out_dir, "world.json"), encoding="utf-8") as f:
        world = json.load(f)
    found, wanted = ShapesWorldConfig(**world["config"]).to_dict(), config.to_dict()
    differ = sorted(k for k in wanted if found[k] != wanted[k] and k not in TRAIN_EXTRA_SETTINGS)
    if differ:
        raise ValueError(f"rewrite_train_extra: {out_dir} was generated with other {differ}; only "
                         f"{', '.join(TRAIN_EXTRA_SETTINGS[:-1])} and {TRAIN_EXTRA_SETTINGS[-1]} can change "
                         f"without generating the world again")
    extra_file = os.path.join(out_dir, "train_extra.jsonl")
    counts = world["counts"]
    shutil.rmtree(os.path.join(out_dir, "images", OFFGRID_FOLDER), ignore_errors=True)
    if config.has_train_extra():
        with open(os.path.join(out_dir, "train.jsonl"), encoding="utf-8") as f:
            train = [json.loads(line) for line in f if line.strip()]
        extra = train_extra_samples(out_dir, train, config)
        _write_jsonl(extra_file, extra)
        counts["train_extra"] = {"samples": len(extra)}
    else:
        if os.path.exists(extra_file):
            os.remove(extra_file)
        counts.pop("train_extra", None)
    order = ("train", "train_extra", *SPLITS[1:], "text")  # as generate_shapes_world lists them
    world["counts"] = {k: counts[k] for k in order if k in counts}
    world["config"] = wanted
    _write_world(out_dir, world)  # last: a crash before it leaves world.json stale, so the next run rewrites again
    return world["counts"]


# ----------------------------------------------------------------------------------------------------
# Command line


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _extra_questions(text: str) -> dict[str, int]:
    out = {}
    for item in _names(text):
        qtype, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected TYPE=N pairs like relation=12, got {item!r}")
        out[qtype.strip()] = int(n)
    return out


def main(argv=None, prog: str = "python -m fusion.data.shapes_world") -> dict:
    defaults = ShapesWorldConfig()
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Write a synthetic shapes-world dataset (images, videos, text). "
                                                 "Into a folder holding a world of other settings only with "
                                                 "--overwrite, unless only the extra-sample options differ: those "
                                                 "rewrite train_extra.jsonl and draw nothing else again.")
    parser.add_argument("out_dir", help="folder to write the dataset to")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    for name in ("train_images", "val_images", "test_images", "train_videos", "val_videos", "test_videos",
                 "questions_per_image", "questions_per_video", "text_samples", "image_size", "video_size",
                 "video_frames", "max_shapes", "video_crf"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                            help="default: %(default)s")
    parser.add_argument("--video-fps", type=float, default=defaults.video_fps, help="default: %(default)s")
    parser.add_argument("--train-jitter", type=float, default=defaults.train_jitter,
                        help="0..1: how far from its cell's centre a shape of a training image may sit")
    parser.add_argument("--train-extra-questions", type=_extra_questions, default={}, metavar="TYPE=N,...",
                        help="more questions of these types per training image, written to train_extra.jsonl, "
                             "e.g. relation=12")
    parser.add_argument("--train-extra-balanced", nargs="?", const=True, default=False, type=_names,
                        metavar="TYPE,...", help="extra questions keep each type's answers even (relation: half "
                                                 "yes, half no); with types, only those types' answers. Without "
                                                 "types, put OUT_DIR before this option (it would take OUT_DIR "
                                                 "as its types): %(prog)s OUT_DIR "
                                                 "--train-extra-balanced")
    parser.add_argument("--train-extra-offgrid-images", type=int, default=0, metavar="N",
                        help="N more training images in train_extra.jsonl, shapes anywhere in their cells")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a world written there with other settings (its files only)")
    parser.add_argument("--no-captions", action="store_true", help="no caption sample per image")
    parser.add_argument("--train-video-captions", action="store_true",
                        help="a caption sample per training video too (its events, naming each shape)")
    parser.add_argument("--shapes", type=_names, default=defaults.shapes,
                        help=f"comma-separated, from {','.join(SHAPE_NAMES)}")
    parser.add_argument("--colors", type=_names, default=defaults.colors,
                        help=f"comma-separated, from {','.join(COLOR_RGB)}")
    parser.add_argument("--focus", type=_names, default=(),
                        help="shapes/colours every image and video must show (a new-concept dataset)")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(ShapesWorldConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    try:
        config = ShapesWorldConfig(**values, captions=not args.no_captions)
    except ValueError as err:  # a bad setting: a usage error (exit 2) naming it, no traceback
        parser.error(str(err).removeprefix("ShapesWorldConfig: ").replace("_", "-"))
    found = world_settings_in(args.out_dir)
    differ = {k: (found[k], v) for k, v in config.to_dict().items() if found[k] != v} if found else {}
    extras_only = bool(differ) and set(differ) <= set(TRAIN_EXTRA_SETTINGS)
    if differ and not extras_only and not args.overwrite:
        parser.error(f"{args.out_dir} holds a shapes world written with other settings (there vs asked: {differ}); "
                     f"pass --overwrite to replace it, or give another folder")
    start = time.perf_counter()
    if extras_only and not args.overwrite:  # the extra samples alone: the rest of the world stays as it is
        counts, done = rewrite_train_extra(args.out_dir, config), "rewrote the extra training samples of"
    else:
        counts, done = generate_shapes_world(args.out_dir, config), "wrote"
    seconds = time.perf_counter() - start
    print(json.dumps(counts))
    print(f"{done} {args.out_dir} in {seconds:.1f} s")
    return counts


if __name__ == "__main__":
    main()
