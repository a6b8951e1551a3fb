"""Publish a finished `shapes-tiny` run as the default model that ships in `fusion/default_model/`.

    fusion train examples/recipes/shapes-tiny.yaml          # writes runs/shapes-tiny/
    python examples/recipes/publish_default_model.py        # runs/shapes-tiny -> fusion/default_model/

It writes the run's final weights (in bfloat16 unless told otherwise, to keep the package small),
evaluates exactly those shipped weights on the held-out test split of the run's shapes world, and
writes `evaluation.json` (the figures and how to regenerate the split) and `MODEL_CARD.md` beside
them. `tests/test_default_model.py` regenerates the split and checks the card's figures with `fusion eval`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fusion import FusionModel  # noqa: E402
from fusion.checkpoint import atomic_folder, write_json  # noqa: E402
from fusion.data.shapes_world import scene_layout  # noqa: E402
from fusion.evaluation.evaluate import evaluate  # noqa: E402

EVALUATION_FILE = "evaluation.json"
CARD_FILE = "MODEL_CARD.md"
TASK_TITLES = {"vqa": "VQA", "video-qa": "video QA"}


def load_run(run_dir: Path) -> dict:
    """What the card needs from a run folder written by `fusion train`."""
    missing = [name for name in ("final", "train_config.json", "run_summary.json")  # the summary comes last
               if not (run_dir / name).exists()]
    if missing:
        raise SystemExit(f"publish: {run_dir} is not a finished run ({', '.join(missing)} missing); "
                         f"run `fusion train examples/recipes/shapes-tiny.yaml` to the end first")
    config = json.loads((run_dir / "train_config.json").read_text())
    spec = (config.get("data") or {}).get("shapes_world")
    if not spec:
        raise SystemExit(f"publish: {run_dir}/train_config.json has no data.shapes_world; the default model "
                         f"is trained on the shapes world")
    data_dir = (Path(config["base_dir"]) / spec["out_dir"]).resolve()
    world = json.loads((data_dir / "world.json").read_text())
    return {"config": config, "summary": json.loads((run_dir / "run_summary.json").read_text()), "world": world,
            "data_dir": data_dir}


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _scenes(samples: list[dict], media: str) -> dict[str, list[dict]]:
    """{image or video path: its recorded objects} over the samples that show one."""
    return {s[media][0]: s["meta"]["objects"] for s in samples if s.get(media) and "objects" in s.get("meta", {})}


def training_overlap(data_dir: Path) -> dict:
    """How close the test split's media come to the training media (`train.jsonl` and `train_extra.jsonl`).

    `same_images` / `same_videos`: test images / clips whose recorded objects equal a training one's (the
    objects decide every pixel, so these would be the same picture). `same_layout`: test images with exactly
    the shapes, colours and cells of some training image (the set of (shape, colour, row, column)), drawn a
    little differently (sizes and offsets in the cells).
    """
    train = _read_jsonl(data_dir / "train.jsonl")
    if (data_dir / "train_extra.jsonl").exists():
        train += _read_jsonl(data_dir / "train_extra.jsonl")
    test = _read_jsonl(data_dir / "test.jsonl")

    def exact(objects):
        return json.dumps(objects, sort_keys=True)

    train_images, test_images = _scenes(train, "images"), _scenes(test, "images")
    train_videos, test_videos = _scenes(train, "videos"), _scenes(test, "videos")
    seen_images = {exact(o) for o in train_images.values()}
    seen_layouts = {scene_layout(o) for o in train_images.values()}
    seen_videos = {exact(o) for o in train_videos.values()}
    return {"train_images": len(train_images), "test_images": len(test_images), "test_videos": len(test_videos),
            "same_images": sum(exact(o) in seen_images for o in test_images.values()),
            "same_videos": sum(exact(o) in seen_videos for o in test_videos.values()),
            "same_layout": sum(scene_layout(o) in seen_layouts for o in test_images.values())}


def overlap_note(overlap: dict) -> str:
    """What the card says about the test media and the training media (`training_overlap`)."""
    if overlap["same_images"] or overlap["same_videos"]:
        exact = (f"{overlap['same_images']} of the {overlap['test_images']} test images and "
                 f"{overlap['same_videos']} of the {overlap['test_videos']} test clips are drawn exactly as a "
                 f"training one is")
    else:
        exact = "No test image or clip is drawn exactly as a training one is"
    note = (f"{exact}, but the world is small: {overlap['same_layout']} of the {overlap['test_images']} test "
            f"images show the same shapes and colours in the same cells as one of the {overlap['train_images']} "
            f"training images (sizes and offsets in the cells differ a little), so the image figures are partly "
            f"on layouts seen in training.")
    return textwrap.fill(note, width=110)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def results_table(results: dict) -> str:
    """The card's figures, one row per task and question type (the test parses these rows)."""
    rows = ["| task | question type | questions | accuracy |", "|---|---|---|---|"]
    for task in ("vqa", "video-qa"):
        r = results["tasks"].get(task)
        if not r:
            continue
        rows.append(f"| {task} | all | {r['count']} | {percent(r['accuracy'])} |")
        for qtype, value in r["by_type"].items():
            rows.append(f"| {task} | {qtype} | {r['count_by_type'][qtype]} | {percent(value)} |")
    caption = results["tasks"].get("caption")
    if caption:
        rows.append(f"| caption | BLEU-4 | {caption['count']} | {caption['bleu4']:.3f} |")
        rows.append(f"| caption | CIDEr | {caption['count']} | {caption['cider']:.3f} |")
    return "\n".join(rows)


def weakest(results: dict, n: int = 3) -> str:
    scored = [(value, f"{TASK_TITLES[task]} {qtype}") for task in ("vqa", "video-qa")
              for qtype, value in results["tasks"].get(task, {}).get("by_type", {}).items()]
    return ", ".join(f"{name} ({percent(value)})" for value, name in sorted(scored)[:n])


def data_entry(entry) -> str:
    """A stage's data entry as the card names it: "train.jsonl (videos only, 2x)"."""
    if isinstance(entry, str):
        return Path(entry).name
    parts = []
    if entry.get("types"):
        parts.append(", ".join(entry["types"]))
    if entry.get("media"):
        parts.append(" and ".join(f"{m}s" if m != "text" else "text" for m in entry["media"]) + " only")
    if entry.get("repeat", 1) > 1:
        parts.append(f"{entry['repeat']}x")
    return Path(entry["path"]).name + (f" ({'; '.join(parts)})" if parts else "")


def model_card(run: dict, results: dict, model: FusionModel, dtype: torch.dtype, size_mb: float) -> str:
    config, summary, world = run["config"], run["summary"], run["world"]
    wcfg, counts = world["config"], world["counts"]
    params = sum(p.numel() for p in model.parameters())
    dec = config["model"]["decoder"]
    vis = config["model"]["vision"]
    stages = "\n".join(
        f"| {s['name']} | {s['steps']} | {s['batch_size']} | "
        f"{', '.join(f'{part} {rate:g}' for part, rate in s['lr'].items())} | "
        f"{', '.join(data_entry(d) for d in s['data'])} |" for s in config["stages"])
    if summary.get("wall_seconds_total") is not None:  # all the run's parts, each up to its last checkpoint
        minutes = summary["wall_seconds_total"] / 60
        resumed = " (in parts: the run was resumed from a checkpoint)" if summary.get("resumed") else ""
    else:
        minutes = summary["wall_seconds"] / 60
        resumed = " (resumed; the time covers the last part only)" if summary.get("resumed") else ""
    computed = f" in {summary['computed_in']}" if summary.get("computed_in") else ""
    position = {"per_token": " (plus a learned embedding per image-token position)",
                "rows_cols": " (plus a learned embedding of each image token's row and column)",
                }.get(model.config.image_position_embedding, "")
    qk_norm = "QK norm in RoPE layers" if model.config.decoder.use_qk_norm else "no QK norm"
    extra_questions = wcfg.get("train_extra_questions") or {}
    more = " and ".join(f"{n} more {qtype}" for qtype, n in extra_questions.items())
    balanced_types = wcfg.get("train_extra_balanced")
    balanced = (", answers kept even" if balanced_types is True else
                f", {' and '.join(balanced_types)} answers kept even" if balanced_types else "")
    extra = (f"; training images also ask up to {more} questions (where the scene has them{balanced}; in "
             "`train_extra.jsonl`, seen by the stages that list it)") if more else ""
    offgrid = wcfg.get("train_extra_offgrid_images") or 0
    if offgrid:
        extra += (f"; {offgrid} more training images, in `train_extra.jsonl` too, whose shapes sit anywhere in "
                  "their cells (across the image tokens, as the shapes of clips do), with their questions and "
                  "captions")
    clip_captions = (", and one caption per training clip (its events in order)"
                     if wcfg.get("train_video_captions") else "")
    overlap = overlap_note(training_overlap(run["data_dir"]))
    return f"""# fusion default model: `shapes-tiny`

The model that `fusion.pipeline(task)` loads when no `model=` is given. It is a tiny early-fusion
Mixture-of-Experts model trained from scratch, on a CPU, by the project's own recipe
(`examples/recipes/shapes-tiny.yaml`) on the synthetic **shapes world**. It exists so that the
pipelines, the demo and the notebooks run anywhere without downloading anything. **It knows the
shapes world and nothing else.**

## What it is
- {params / 1e6:.2f} M parameters, stored in {str(dtype).removeprefix('torch.')} ({size_mb:.1f} MB).
- Vision: a ViT (open_clip tower, {vis['layers']} layers, width {vis['width']}, {vis['image_size']} px images,
  {vis['patch_size']} px patches, convolutional stem), pixel-shuffle adapter into the decoder{position}.
- Decoder: Llama-4-style, {dec['num_layers']} layers, hidden size {dec['hidden_size']}, {dec['num_heads']} heads
  ({dec['num_kv_heads']} KV heads), MoE every {dec['interleave_moe_layer_step']} layers with {dec['num_experts']}
  routed experts (top-{dec['top_k']}) plus a shared expert, NoPE every {dec['nope_interval']} layers, {qk_norm}.
- A byte-level BPE tokenizer with {model.tokenizer.vocab_size} tokens trained on the shapes-world text.
- Videos: {config['model']['video']['num_frames']} frames sampled uniformly.

## Training
Data: the shapes world (`fusion.data.shapes_world`, seed {wcfg['seed']}): {wcfg['image_size']} px images with
1-{wcfg['max_shapes']} shapes ({', '.join(wcfg['shapes'])}) in {', '.join(wcfg['colors'])} on a black background,
questions on colour, shape, count, position, existence and relation, one caption per image{extra};
{wcfg['video_frames']}-frame {wcfg['video_size']} px clips of shapes that move, appear and disappear with questions on
direction, what appeared, what disappeared and what happened first{clip_captions}; a text-only corpus.
Train split: {counts['train']['images']} images, {counts['train']['videos']} videos, {counts['train']['samples']}
conversations; text corpus: {counts['text']['samples']} samples.

| stage | steps | batch | learning rate per part | data |
|---|---|---|---|---|
{stages}

Wall time of the whole recipe (tokenizer, all stages, final evaluation; generating the shapes world on first
use adds about 30 s: 25 s for `fusion shapes-world` with the recipe's settings on 2026-12-02):
**{minutes:.1f} minutes** on {summary['device']} with {summary['threads']} threads{computed}{resumed}, torch {summary['torch']}.

## Evaluation
Held-out test split of the same world ({counts['test']['images']} images, {counts['test']['videos']} videos), greedy
decoding, normalised exact match; these are the shipped {str(dtype).removeprefix('torch.')} weights as evaluated by
`fusion eval`:

{results_table(results)}

{overlap}

## Limits
- It has only ever seen the shapes world: {len(wcfg['shapes'])} shapes, {len(wcfg['colors'])} colours, a black
  background, {wcfg['image_size']} px images. Any other image gets an answer in that vocabulary, and it means nothing.
- Its language is the few question templates of the world; rephrased questions may fail.
- Weakest question types: {weakest(results)}.
- Not for any real use: it is a fixture for the pipelines, the demo and the notebooks, and a starting point
  for fine-tuning on your own data (see `examples/finetune_custom_data.ipynb`).

## Reproduce
```
fusion train examples/recipes/shapes-tiny.yaml          # about {minutes:.0f} minutes on a 2-core CPU{computed}
python examples/recipes/publish_default_model.py        # writes fusion/default_model/
pytest tests/test_default_model.py                      # regenerates the test split, checks this card
```
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "shapes-tiny"))
    parser.add_argument("--dest", default=str(ROOT / "fusion" / "default_model"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    run = load_run(Path(args.run_dir))
    dtype = getattr(torch, args.dtype)
    model = FusionModel.from_pretrained(Path(args.run_dir) / "final", dtype=dtype).eval()
    test_file = run["data_dir"] / "test.jsonl"
    with atomic_folder(args.dest) as folder:
        model.save_pretrained(folder)
        shipped = FusionModel.from_pretrained(folder).eval()
        results = evaluate(shipped, test_file, batch_size=args.batch_size)
        results.pop("dataset", None)
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6  # (megabytes, as the card says)
        write_json(folder / EVALUATION_FILE, {
            "split": "test", "shapes_world": run["world"]["config"], "batch_size": args.batch_size,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "processor": platform.processor() or platform.machine()},
            "results": results})
        (folder / CARD_FILE).write_text(model_card(run, results, shipped, dtype, size_mb))
    print(results_table(results))
    print(f"published to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
