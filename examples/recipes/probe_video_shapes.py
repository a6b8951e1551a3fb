"""Can a model tell the shape of a video's object when it sees one frame as an image?

A diagnostic for the recipe: for each "What appears?" / "What disappears?" question of a shapes-world
split whose clip has one object of that colour, it shows the model the frame where the object is
visible (the last frame for "appears", the first for "disappears") as an image and asks "What shape is
the <colour> object?". It prints how often that answer is right, next to how often the video question
itself was answered right, so you can see whether video errors come from recognising the shape at all.

    python examples/recipes/probe_video_shapes.py fusion/default_model data/shapes/test.jsonl
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from PIL import Image

import fusion
from vision.video import sample_frames


def main(argv=None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder")
    parser.add_argument("data", help="a shapes-world split (JSONL) with video questions")
    args = parser.parse_args(argv)
    root = Path(args.data).parent
    samples = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    samples = [s for s in samples if s.get("type") in ("appeared", "disappeared")]
    image_qa, video_qa = fusion.pipeline("vqa", model=args.model), fusion.pipeline("video-qa", model=args.model)
    counts: Counter = Counter()
    for s in samples:
        objects = s["meta"]["objects"]
        event = "appear" if s["type"] == "appeared" else "disappear"
        target = next(o for o in objects if o["event"] == event)
        if sum(o["color"] == target["color"] for o in objects) != 1:
            continue  # "the <colour> object" would be ambiguous
        video = root / s["videos"][0]
        frames, _ = sample_frames(video, num_frames=s["meta"]["frames"])  # every frame of the clip
        frame = Image.fromarray(frames[-1] if event == "appear" else frames[0])
        shape = image_qa(frame, f"What shape is the {target['color']} object?")[0]["answer"]
        question = s["conversations"][0]["content"].split("\n", 1)[1]
        answer = video_qa(str(video), question)[0]["answer"]
        counts["clips"] += 1
        counts["frame shape right"] += shape == target["shape"]
        counts["video question right"] += answer == s["conversations"][1]["content"]
    print(json.dumps(dict(counts)))
    return counts


if __name__ == "__main__":
    main()
