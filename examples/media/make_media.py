"""Regenerate the sample media of the examples: three shapes-world images, one short video, their
true answers (`media.json`) and the README of this folder.

    python examples/media/make_media.py            # rewrites everything in examples/media/

The scenes are written out by hand below (not drawn at random) so that each file has clear, known
answers; they are drawn with the shapes world's own renderer (`fusion.data.shapes_world`), so they
look exactly like the data the default model was trained on (64x64 pixels, black background,
shapes in a 3x3 grid). The questions use the shapes world's own question templates and their
answers are computed by it, not typed in. Running it twice gives the same PNGs and JSON (the mp4 is
the same as long as the installed libx264 is).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout, when run as a script

from fusion.data.shapes_world import (  # noqa: E402
    GRID, ShapesWorldConfig, caption_for, image_questions, position_name, render_shapes, render_video,
    video_questions)
from vision import write_video  # noqa: E402

CONFIG = ShapesWorldConfig()  # the default world: circle/square/triangle in red/green/blue/yellow, 64 px, 4 fps
SIZE = CONFIG.image_size

# (file, [(shape, color, row, col)], [questions]); every question must be one the world asks about the scene
IMAGES = [
    ("scene_0.png", [("circle", "red", 0, 0), ("square", "green", 2, 2)],
     ["What color is the circle?", "Where is the green square?", "How many shapes are there?",
      "Is the red circle left of the green square?"]),
    ("scene_1.png", [("triangle", "blue", 1, 1)],
     ["What shape is at the center?", "What color is the triangle?", "How many shapes are there?",
      "Is there a red circle?"]),
    ("scene_2.png", [("triangle", "green", 0, 2), ("circle", "yellow", 1, 0), ("circle", "blue", 2, 1)],
     ["What shape is the green object?", "How many circles are there?", "Where is the yellow circle?",
      "Is there a red shape?"]),
]

VIDEO_FILE = "clip.mp4"
VIDEO_QUESTIONS = ["Which way does the red circle move?", "What appears?"]


def scene(objects: list[tuple[str, str, int, int]]) -> list[dict]:
    """Objects in the shapes world's format, each centred in its grid cell."""
    cell = SIZE / GRID
    out = []
    for shape, color, row, col in objects:
        out.append({"shape": shape, "color": color, "row": row, "col": col, "position": position_name(row, col),
                    "center": [round((col + 0.5) * cell, 2), round((row + 0.5) * cell, 2)],
                    "radius": round(0.38 * cell, 2)})
    return sorted(out, key=lambda o: (o["row"], o["col"]))


def answer(questions, text: str) -> dict:
    for q in questions:
        if q.text == text:
            return {"question": q.text, "answer": q.answer, "type": q.type}
    raise ValueError(f"the shapes world does not ask {text!r} about this scene")


def all_image_questions(objects):
    return [q for qtype in ("color", "shape", "count", "position", "existence", "relation")
            for q in image_questions(objects, CONFIG, qtype)]


def make_video() -> dict:
    """8 frames at 4 fps: a red circle moves left to right across the top half; a green triangle
    appears in the bottom half at frame 4 (1 s)."""
    frames, size = CONFIG.video_frames, CONFIG.video_size
    radius = round(0.15 * size, 2)
    start, end = size / 4, 3 * size / 4
    mover = [[round(start + (end - start) * f / (frames - 1), 2), 16.0] for f in range(frames)]
    appear_at = 4
    appearing = [None if f < appear_at else [40.0, 46.0] for f in range(frames)]
    objects = [
        {"shape": "circle", "color": "red", "event": "move", "direction": "right", "frame": None,
         "radius": radius, "track": mover},
        {"shape": "triangle", "color": "green", "event": "appear", "direction": None, "frame": appear_at,
         "radius": radius, "track": appearing},
    ]
    events = [{"frame": 0, "object": "red circle", "event": "moves", "direction": "right"},
              {"frame": appear_at, "object": "green triangle", "event": "appears"}]
    return {"frames": frames, "fps": CONFIG.video_fps, "size": size, "objects": objects, "events": events}


def main() -> None:
    manifest = {"generator": "examples/media/make_media.py", "images": [], "videos": []}
    for file, spec, questions in IMAGES:
        objects = scene(spec)
        Image.fromarray(render_shapes(objects, SIZE, CONFIG.background, CONFIG.supersample)).save(
            HERE / file, optimize=True)
        asked = all_image_questions(objects)
        manifest["images"].append({"file": file, "caption": caption_for(objects),
                                   "questions": [answer(asked, q) for q in questions], "objects": objects})
    video = make_video()
    write_video(HERE / VIDEO_FILE, render_video(video, CONFIG), fps=CONFIG.video_fps, crf=CONFIG.video_crf)
    asked = video_questions(video)
    manifest["videos"].append({"file": VIDEO_FILE, "frames": video["frames"], "fps": video["fps"],
                               "description": "a red circle moves right; a green triangle appears at 1 s",
                               "questions": [answer(asked, q) for q in VIDEO_QUESTIONS], "events": video["events"]})
    (HERE / "media.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (HERE / "README.md").write_text(readme(manifest))
    for path in sorted(HERE.iterdir()):
        if path.suffix in (".png", ".mp4", ".json"):
            print(f"{path.name:<18} {path.stat().st_size:>6} bytes")


def readme(manifest: dict) -> str:
    lines = ["# Sample media", "",
             "Small shapes-world inputs for `examples/demo.py` and the notebooks, with their true answers.",
             "Written by `python examples/media/make_media.py` (deterministic; it rewrites this README and",
             "`media.json`, which holds the same answers for programs). Images are 64x64 PNGs and the video is",
             f"{manifest['videos'][0]['frames']} frames of 64x64 at {manifest['videos'][0]['fps']:g} fps, like the "
             "training data of the default model.", ""]
    for item in manifest["images"]:
        lines += [f"## `{item['file']}`", "", f"Caption: *{item['caption']}*", "", "| question | answer |",
                  "|---|---|"]
        lines += [f"| {q['question']} | {q['answer']} |" for q in item["questions"]]
        lines.append("")
    for item in manifest["videos"]:
        lines += [f"## `{item['file']}`", "", f"{item['description'][0].upper()}{item['description'][1:]}.", "",
                  "| question | answer |", "|---|---|"]
        lines += [f"| {q['question']} | {q['answer']} |" for q in item["questions"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
