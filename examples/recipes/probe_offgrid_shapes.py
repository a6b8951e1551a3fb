"""Does a model lose a shape when the shape moves off its grid cell's centre, or when it goes through the video codec?

A diagnostic for the recipe, next to `probe_video_shapes.py`: it redraws the image scenes of a
shapes-world split four ways and asks "What shape is the <colour> object?" about every object whose
colour is unique in its scene:

- ``grid``: as the split drew it (each shape near the middle of its grid cell);
- ``off_grid``: the same shapes moved off their cells' centres as far as ``train_jitter=1.0`` moves them
  (still in their cells), as the shapes of videos sit anywhere;
- ``grid_mp4`` / ``off_grid_mp4``: each of those written to an mp4 with the split's codec settings and
  read back as a video frame.

It prints the share of right answers for each, so you can tell whether video errors come from where a
shape sits or from compression.

    python examples/recipes/probe_offgrid_shapes.py fusion/default_model data/shapes/test.jsonl --scenes 100
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

import fusion
from fusion.data import shapes_world as sw
from vision.video import sample_frames
from vision.video_io import write_video


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder")
    parser.add_argument("data", help="a shapes-world split (JSONL) with image captions (their scenes are used)")
    parser.add_argument("--scenes", type=int, default=100, help="how many scenes to redraw")
    parser.add_argument("--seed", type=int, default=5, help="seed of the off-grid placements")
    args = parser.parse_args(argv)
    world_file = Path(args.data).parent / "world.json"
    config = sw.ShapesWorldConfig(**json.loads(world_file.read_text())["config"]) if world_file.exists() \
        else sw.ShapesWorldConfig()
    samples = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    scenes = [s["meta"]["objects"] for s in samples if s.get("task") == "caption"][:args.scenes]
    if not scenes:
        parser.error(f"{args.data} has no image captions (task 'caption') whose scenes could be redrawn")
    qa = fusion.pipeline("vqa", model=args.model)
    rng = np.random.default_rng(args.seed)
    right, asked = Counter(), Counter()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "still.mp4"
        for objects in scenes:
            moved = copy.deepcopy(objects)
            sw._place_jittered(moved, rng, config, 1.0)
            for name, scene in (("grid", objects), ("off_grid", moved)):
                pixels = sw.render_shapes(scene, config.image_size, config.background, config.supersample)
                write_video(clip, np.stack([pixels] * 6), fps=config.video_fps, crf=config.video_crf)
                frames, _ = sample_frames(clip, num_frames=6)
                for variant, image in ((name, Image.fromarray(pixels)), (name + "_mp4", Image.fromarray(frames[3]))):
                    for o in scene:
                        if sum(p["color"] == o["color"] for p in scene) != 1:
                            continue  # "the <colour> object" would be ambiguous
                        answer = qa(image, f"What shape is the {o['color']} object?")[0]["answer"]
                        right[variant] += answer == o["shape"]
                        asked[variant] += 1
    result = {variant: {"right": right[variant], "asked": asked[variant],
                        "share": round(right[variant] / asked[variant], 3)} for variant in asked}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
