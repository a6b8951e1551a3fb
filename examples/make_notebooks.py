"""Write the example notebooks from the cells below, and run them with their outputs saved.

    python examples/make_notebooks.py              # (re)write the three .ipynb files, without outputs
    python examples/make_notebooks.py --execute    # then run each one top to bottom and save its outputs in place
    python examples/make_notebooks.py --execute-only image_pipelines.ipynb   # run existing notebooks in place

The committed notebooks carry the outputs of a real run on the default model: once
`fusion/default_model/` exists (or with FUSION_NOTEBOOK_MODEL=path/to/model for another model), run

    .venv/bin/python examples/make_notebooks.py --execute

(about 5-10 minutes on a 2-core CPU, most of it the fine-tuning notebook) and commit the .ipynb files.
Runs go to the kernel `python3` of this Python (a kernelspec pointing at `sys.executable` is used), in
the examples folder. Edit the notebooks here, not in Jupyter, so that the two stay the same
(tests/test_notebooks.py checks it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

EXAMPLES_DIR = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


SETTINGS_NOTE = """
**Settings.** The notebook takes its model and its sizes from `notebook_settings.py` (next to it):
the default model that ships with fusion unless `FUSION_NOTEBOOK_MODEL` names another model folder,
and tiny sizes when `FUSION_NOTEBOOK_SMOKE=1` (used by the tests; the answers then mean nothing).
Jupyter starts a notebook's kernel in the notebook's folder, which is where that import finds it; to run
the notebook from another folder (a copy of it, papermill's `--cwd`), put `examples/` on `sys.path` first.
"""

# ---------------------------------------------------------------------------------------------------
IMAGE_PIPELINES = [
    md("""
# Captioning and visual question answering

`fusion.pipeline` works like `transformers.pipeline`: name a task, get a callable. This notebook runs
the two image tasks on the sample images in `examples/media/`:

* `"captioning"`: describe an image;
* `"vqa"`: answer a question about an image, with a confidence score.

A pipeline takes one input (and gives one result list) or a list of inputs (and gives a list of
result lists, run in batches).
""" + SETTINGS_NOTE),
    code("""
import time

import matplotlib.pyplot as plt
from PIL import Image

from notebook_settings import MEDIA_DIR, MODEL, describe, media_manifest, settings  # this notebook's settings

import fusion

run = settings("image_pipelines")
print(describe())
manifest = media_manifest()  # the sample images with their true captions and answers
images = [MEDIA_DIR / item["file"] for item in manifest["images"]]
"""),
    md("""
## The sample images

Shapes-world scenes of 64x64 pixels, like the data the default model learned from: up to three shapes
in a 3x3 grid. `examples/media/README.md` lists what each one shows.
"""),
    code("""
fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3))
for ax, path in zip(axes, images):
    ax.imshow(Image.open(path), interpolation="nearest")
    ax.set_title(path.name)
    ax.axis("off")
plt.show()
"""),
    md("""
## Captioning

`fusion.pipeline("captioning")` loads the default model (pass `model="path/to/folder"` or a
`FusionModel` to use another). A list of images goes through the model `batch_size` at a time and
gives one result list per image: `[{"generated_text": ...}]`.
"""),
    code("""
captioner = fusion.pipeline("captioning", model=MODEL, batch_size=run.batch_size)
print(captioner)

start = time.perf_counter()
captions = captioner([str(path) for path in images])  # a list in -> a list of result lists out
print(f"{len(images)} images captioned in {time.perf_counter() - start:.2f} s\\n")
for item, [result] in zip(manifest["images"], captions):
    print(item["file"])
    print("  model:", result["generated_text"])
    print("  true: ", item["caption"])
"""),
    md("""
One input gives one result list. Paths, PIL images, numpy arrays `[H, W, 3]` and tensors are all
accepted:
"""),
    code("""
print(captioner(str(images[0])))
print(captioner(Image.open(images[1])))
"""),
    md("""
## Visual question answering

The VQA pipeline can share the captioner's model (no second load). Each answer comes with a `score`:
the geometric mean of the answer's token probabilities, from 0 to 1, a confidence (not a calibrated
probability of being right).
"""),
    code("""
vqa = fusion.pipeline("vqa", model=captioner.model, batch_size=run.batch_size)
vqa(image=str(images[0]), question="What color is the circle?")
"""),
    md("""
### Many questions in one call

A list of `{"image", "question"}` records is answered in batches; the results come back in the same
order. Here: every question of `media.json`, with the true answers next to the model's.
"""),
    code("""
from pathlib import Path

from fusion.evaluation.metrics import answer_is_correct

records, truths = [], []
for item in manifest["images"]:
    for q in item["questions"]:
        records.append({"image": str(MEDIA_DIR / item["file"]), "question": q["question"]})
        truths.append(q["answer"])

start = time.perf_counter()
results = vqa(records)
print(f"{len(records)} questions in {time.perf_counter() - start:.2f} s\\n")

print(f"{'image':<17} {'question':<46} {'answer':<14} {'score':>5}  true")
for record, [result], truth in zip(records, results, truths):
    mark = "" if answer_is_correct(result["answer"], [truth]) else "   <- wrong"
    print(f"{Path(record['image']).name:<17} {record['question']:<46} {result['answer']:<14} "
          f"{result['score']:5.2f}  {truth}{mark}")
correct = sum(answer_is_correct(r["answer"], [t]) for [r], t in zip(results, truths))
print(f"\\n{correct} of {len(truths)} correct")
"""),
    md("""
Batching does not change the answers: the same records one at a time give the same results.
"""),
    code("""
one_by_one = vqa(records, batch_size=1)
same = all(a[0]["answer"] == b[0]["answer"] and abs(a[0]["score"] - b[0]["score"]) < 1e-3
           for a, b in zip(results, one_by_one))
print("same answers and scores with batch_size=1:", same)
"""),
    md("""
### One question for every image

A list in a field pairs every image with the question (as in `transformers`):
"""),
    code("""
question = "How many shapes are there?"
counts = vqa(image=[str(path) for path in images], question=question)

fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.3))
for ax, path, [result] in zip(axes, images, counts):
    ax.imshow(Image.open(path), interpolation="nearest")
    ax.set_title(f"{result['answer']!r} ({result['score']:.2f})")
    ax.axis("off")
fig.suptitle(question)
plt.show()
"""),
    md("""
## Where does the model look?

`fusion.relevance.patch_relevance` explains one answer: how much each image token (one per 32x32
block of the model's 96-px input here: 16-px patches merged 2x2, so a 3x3 grid, one token per cell of
the scene) contributes to the answer's log-probability (gradient x input). Red is most relevant.
"""),
    code("""
from fusion.relevance import overlay_relevance, patch_relevance

path, question = images[2], "Where is the yellow circle?"
explained = patch_relevance(captioner.model, path, question)

fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
axes[0].imshow(Image.open(path), interpolation="nearest")
axes[0].set_title(path.name)
axes[1].imshow(overlay_relevance(path, explained), interpolation="nearest")
axes[1].set_title(f"answer {explained['answer']!r}")
for ax in axes:
    ax.axis("off")
fig.suptitle(question)
plt.show()
"""),
]

# ---------------------------------------------------------------------------------------------------
VIDEO_QA = [
    md("""
# Video question answering

A video reaches the model as a few sampled frames, each with its time stamp in the prompt. This
notebook shows the two ways to sample frames, `vision.sample_frames`, and then asks
`fusion.pipeline("video-qa")` about the sample clip in `examples/media/`: 8 frames at 4 fps (2 s) in
which a red circle moves right and a green triangle appears after 1 s.
""" + SETTINGS_NOTE),
    code("""
import time

import matplotlib.pyplot as plt

from notebook_settings import MEDIA_DIR, MODEL, describe, media_manifest, settings  # this notebook's settings

import fusion
from vision import sample_frames

run = settings("video_qa")
print(describe())
clip = media_manifest()["videos"][0]  # the sample video and its true answers
video = MEDIA_DIR / clip["file"]
print(video.name, "-", clip["description"])


def show_frames(sampled, title):
    \"\"\"The sampled frames in a row, each titled with its time stamp.\"\"\"
    frames, timestamps = sampled
    fig, axes = plt.subplots(1, len(frames), figsize=(1.6 * len(frames), 2.1), squeeze=False)
    for ax, frame, seconds, index in zip(axes[0], frames, timestamps, sampled.indices):
        ax.imshow(frame, interpolation="nearest")
        ax.set_title(f"{seconds:.2f} s\\n(frame {index})", fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    plt.show()
"""),
    md("""
## Sampling frames

**Uniform** (`num_frames=n`): the video is cut into `n` equal segments and the frame in the middle of
each is taken. A frame's time stamp is its index divided by the video's frame rate.
`sample_frames` returns the frames (`uint8 [T, H, W, 3]`) and their time stamps, and also tells which
frames it took and the video's frame rate and length.
"""),
    code("""
uniform = sample_frames(video, num_frames=run.num_frames)
print(f"{uniform.total_frames} frames at {uniform.avg_fps:g} fps; took frames {uniform.indices}")
print("time stamps:", uniform.timestamps)
show_frames(uniform, f"uniform, num_frames={run.num_frames}")
"""),
    code("""
show_frames(sample_frames(video, num_frames=4), "uniform, num_frames=4")
"""),
    md("""
**By frame rate** (`fps=f`): the first frame, then one every `1/f` seconds, at most `max_frames`
(when there would be more, `max_frames` of them are picked uniformly).
"""),
    code("""
by_rate = sample_frames(video, fps=run.fps, max_frames=32)
print("time stamps:", by_rate.timestamps)
show_frames(by_rate, f"fps={run.fps:g}")
"""),
    md("""
## Asking about the video

The pipeline samples frames with the model's own settings unless told otherwise (the default model
was trained on 8 uniformly sampled frames).
"""),
    code("""
video_qa = fusion.pipeline("video-qa", model=MODEL)
print(video_qa)
print("the model's frame sampling:", video_qa.model.processor.video)

for q in clip["questions"]:
    start = time.perf_counter()
    [result] = video_qa(video=str(video), question=q["question"])
    print(f"{q['question']:<38} -> {result['answer']!r:<18} score {result['score']:.2f}   "
          f"true: {q['answer']!r}   ({time.perf_counter() - start:.2f} s)")
"""),
    md("""
### Uniform or frame-rate sampling, per call

`num_frames=` or `fps=` at call time (or when building the pipeline) choose the sampling. With
`fps=2` the model sees 4 frames half a second apart; a model trained on 8 frames may answer
differently from so few.
"""),
    code("""
for sampling in ({"num_frames": run.num_frames}, {"fps": run.fps}):
    print(sampling)
    for q in clip["questions"]:
        [result] = video_qa(video=str(video), question=q["question"], **sampling)
        print(f"  {q['question']:<38} -> {result['answer']!r:<18} score {result['score']:.2f}")
"""),
    md("""
### Frames sampled once, many questions

A `sample_frames` result (or a `(frames, timestamps)` pair) can be passed instead of a path, so the
video is decoded once. A list of records is answered in batches:
"""),
    code("""
records = [{"video": uniform, "question": q["question"]} for q in clip["questions"]]
for record, [result] in zip(records, video_qa(records, batch_size=len(records))):
    print(f"{record['question']:<38} -> {result['answer']!r}")
"""),
]

# ---------------------------------------------------------------------------------------------------
FINETUNE = [
    md("""
# Teaching the model something new: fine-tuning on your own data

The default model knows three shapes (circle, square, triangle) in four colours. Here we make a
small dataset with a shape it has never seen, a **star**, measure the model on it, fine-tune it the
Llama 4 way, and measure again:

1. **stage 1**: train the vision encoder and the adapter against the frozen language decoder;
2. **stage 2**: unfreeze everything, the encoder at a lower learning rate.

With the normal settings this takes about 5 minutes on a 2-core CPU. Your
own data trains the same way: a JSONL file of conversations with image paths (see
`fusion.data.datasets`); the cells that pick samples to show and to probe read fields of the shapes
world's own files (`task`, `meta`), which your file need not have.
""" + SETTINGS_NOTE),
    code("""
import json
import os
import shutil
import time

# this notebook's settings
from notebook_settings import MEDIA_DIR, MODEL, SMOKE, WORK_DIR, describe, media_manifest, settings

import matplotlib.pyplot as plt
import torch
import yaml
from PIL import Image

import fusion
from fusion.data.shapes_world import generate_shapes_world, new_concept_config, scene_layout
from fusion.evaluation.evaluate import evaluate, format_results
from fusion.evaluation.metrics import answer_is_correct
from fusion.relevance import overlay_relevance, patch_relevance
from fusion.run_log import read_metrics
from fusion.trainer import train

run = settings("finetune")
BASE = MODEL or "default"  # the model we start from: FUSION_NOTEBOOK_MODEL, or the one that ships with fusion
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
work = WORK_DIR / "finetune_custom_data"
print(describe())
print("start from:", BASE)
print("work folder:", os.path.relpath(work))
"""),
    md("""
## 1. A dataset with a new concept

`new_concept_config(new_shapes=["star"])` adds the star to the shapes world and puts at least one
star in every image; the other shapes and colours still appear around it. `generate_shapes_world`
writes images and JSONL files (`train`, `val`, `test`) of questions and captions. We keep to images
(no videos).

The world is small: some test images show the same shapes and colours in the same cells as a
training image (drawn a little differently). Measured on those, fine-tuning would partly be scored on
what it memorised, so the before/after figures below use only the test images whose layout no
training image has (`test_unseen.jsonl`).
"""),
    code("""
data = work / "data"
shutil.rmtree(data, ignore_errors=True)  # always the same, fresh dataset
world = new_concept_config(new_shapes=["star"], seed=1, train_images=run.train_images,
                           val_images=run.val_images, test_images=run.test_images,
                           train_videos=0, val_videos=0, test_videos=0, text_samples=0)
counts = generate_shapes_world(data, world)
print({split: counts[split] for split in ("train", "val", "test")})

samples = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
print("\\none sample:", json.dumps(samples[0])[:300], "...")

# the test samples whose image shows a layout (shapes, colours, cells) no training image shows
seen = {scene_layout(s["meta"]["objects"]) for s in samples}
tests = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
unseen = [s for s in tests if scene_layout(s["meta"]["objects"]) not in seen]
test_file = data / "test_unseen.jsonl"
test_file.write_text("".join(json.dumps(s) + "\\n" for s in unseen))
print(f"\\ntest images on layouts not in training: {len({s['images'][0] for s in unseen})} of "
      f"{len({s['images'][0] for s in tests})} ({len(unseen)} of {len(tests)} samples)")
"""),
    code("""
shown = [s for s in samples if s["task"] == "vqa"][::6][:4]
fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4))
for ax, sample in zip(axes, shown):
    question = sample["conversations"][0]["content"].replace("<image>\\n", "")
    ax.imshow(Image.open(data / sample["images"][0]), interpolation="nearest")
    ax.set_title(f"{question}\\n-> {sample['conversations'][1]['content']}", fontsize=8)
    ax.axis("off")
plt.show()
"""),
    md("""
## 2. How well does the model know stars now?

`evaluate` answers every test question greedily and scores exact matches, overall and per question
type; captions get BLEU-4 and CIDEr. We also keep one test image and a question about its star to
look at before and after.
"""),
    code("""
base = fusion.FusionModel.from_pretrained(BASE, device=DEVICE)
before = evaluate(base, test_file, limit=run.eval_limit, batch_size=run.eval_batch_size, progress=False)
print(format_results(before))

# A test image to look at before and after: the first whose star is the only object of its colour,
# so that "What shape is the <colour> object?" has the answer "star".
probe = next((s for s in unseen if s["task"] == "caption" and any(
    o["shape"] == "star" and [p["color"] for p in s["meta"]["objects"]].count(o["color"]) == 1
    for o in s["meta"]["objects"])), next(s for s in unseen if s["task"] == "caption"))
star = next(o for o in probe["meta"]["objects"] if o["shape"] == "star")
probe_image = data / probe["images"][0]
probe_question = f"What shape is the {star['color']} object?"
[probe_before] = fusion.pipeline("vqa", model=base)(image=str(probe_image), question=probe_question)
print(f"\\n{probe_question} -> {probe_before['answer']!r} (true: 'star')")
"""),
    md("""
## 3. Fine-tune in two stages

A training run is data: stages, each with its data, its length and a learning rate per part
(`vision`, `adapter`, `decoder`). A part left out (or at 0) is frozen. `model: {init_from: ...}`
starts from the model folder. The same file runs from a shell with `fusion train finetune.yaml`.
"""),
    code("""
def beside_the_config(path):  # a config's paths are read from its own folder, `work`
    return os.path.relpath(path, work)


def stage(name, steps, lr):
    return {"name": name, "data": beside_the_config(data / "train.jsonl"), "group_by_media": True, "steps": steps,
            "batch_size": run.batch_size, "warmup_steps": min(10, steps), "lr": lr,
            "eval": {"data": beside_the_config(data / "val.jsonl"), "limit": run.val_limit,
                     "every": run.eval_every}}


recipe = {
    "name": "finetune-star",
    "output_dir": beside_the_config(work / "run"),
    "seed": 0,
    "precision": "auto",      # bf16 autocast where the device computes bf16 natively (GPU; CPU with AVX512-BF16
                              # or AMX), else float32 (bf16 emulated on an AVX2-only CPU is many times slower)
    "log_every": run.log_every,
    "checkpoint_every": 0,    # resumable checkpoints only at the end of each stage
    "model": {"init_from": BASE},
    "stages": [
        stage("cotrain", run.stage1_steps, {"vision": 5.0e-4, "adapter": 1.0e-3}),                  # decoder frozen
        stage("unfreeze", run.stage2_steps, {"vision": 1.0e-4, "adapter": 3.0e-4, "decoder": 3.0e-4}),
    ],
}
recipe_path = work / "finetune.yaml"
recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
print(recipe_path.read_text())
"""),
    code("""
shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run (train(..., resume=True) would continue one)
start = time.perf_counter()
final = train(recipe_path)
train_seconds = time.perf_counter() - start
print(f"trained in {train_seconds / 60:.1f} min; the model is in {os.path.relpath(final)}")
"""),
    md("""
## 4. Measure again
"""),
    code("""
tuned = fusion.FusionModel.from_pretrained(final, device=DEVICE)
after = evaluate(tuned, test_file, limit=run.eval_limit, batch_size=run.eval_batch_size, progress=False)
print(format_results(after))
[probe_after] = fusion.pipeline("vqa", model=tuned)(image=str(probe_image), question=probe_question)
print(f"\\n{probe_question} -> before {probe_before['answer']!r}, after {probe_after['answer']!r} (true: 'star')")
"""),
    code("""
def summary_of(results):
    vqa = results["tasks"].get("vqa", {})
    caption = results["tasks"].get("caption", {})
    return {"vqa_accuracy": vqa.get("accuracy"), "by_type": vqa.get("by_type", {}), "questions": vqa.get("count"),
            "caption_bleu4": caption.get("bleu4"), "caption_cider": caption.get("cider")}


summary = {"model": BASE, "smoke": SMOKE, "device": DEVICE, "train_seconds": round(train_seconds, 1),
           "steps": [run.stage1_steps, run.stage2_steps], "before": summary_of(before), "after": summary_of(after)}
(work / "summary.json").write_text(json.dumps(summary, indent=2))

print(f"{'':<16}{'before':>8}{'after':>8}")
rows = [("VQA accuracy", "vqa_accuracy")] + [(t, t) for t in summary["after"]["by_type"]]
for label, key in rows:
    b = summary["before"]["by_type"].get(key, summary["before"].get(key))
    a = summary["after"]["by_type"].get(key, summary["after"].get(key))
    print(f"{label:<16}{b if b is None else format(b, '.3f'):>8}{a if a is None else format(a, '.3f'):>8}")
for label, key in (("caption BLEU-4", "caption_bleu4"), ("caption CIDEr", "caption_cider")):
    b, a = summary["before"][key], summary["after"][key]
    print(f"{label:<16}{b if b is None else format(b, '.3f'):>8}{a if a is None else format(a, '.3f'):>8}")

types = list(summary["after"]["by_type"])
fig, ax = plt.subplots(figsize=(7, 3))
width = 0.38
ax.bar([i - width / 2 for i in range(len(types))], [summary["before"]["by_type"].get(t, 0) for t in types],
       width, label="before")
ax.bar([i + width / 2 for i in range(len(types))], [summary["after"]["by_type"][t] for t in types], width,
       label="after")
ax.set_xticks(range(len(types)), types)
ax.set_ylim(0, 1)
ax.set_ylabel("accuracy, unseen test layouts")
ax.legend()
plt.show()
"""),
    md("""
Did it forget what it knew? The sample images of `examples/media/` hold no star:
"""),
    code("""
media = media_manifest()
records = [{"image": str(MEDIA_DIR / item["file"]), "question": q["question"]}
           for item in media["images"] for q in item["questions"]]
truths = [q["answer"] for item in media["images"] for q in item["questions"]]
for name, model in (("before", base), ("after", tuned)):
    answers = fusion.pipeline("vqa", model=model)(records, batch_size=len(records))
    correct = sum(answer_is_correct(r["answer"], [t]) for [r], t in zip(answers, truths))
    print(f"{name}: {correct} of {len(truths)} sample-media questions right")
"""),
    md("""
## 5. Training curves

The trainer logs every few steps to `metrics.jsonl` in the run folder (`fusion.run_log.plot_metrics`
draws the same as a PNG). The dotted line is where stage 2 starts; the validation points are
measured at the end of each stage (and every `eval.every` steps).
"""),
    code("""
entries = read_metrics(work / "run" / "metrics.jsonl")
train_entries = [e for e in entries if e["kind"] == "train"]
eval_entries = [e for e in entries if e["kind"] == "eval"]

fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.5))
for name in dict.fromkeys(e["stage"] for e in train_entries):
    points = [e for e in train_entries if e["stage"] == name]
    ax_loss.plot([e["step"] for e in points], [e["loss"] for e in points], label=f"train loss ({name})")
with_loss = [e for e in eval_entries if e.get("val_loss") is not None]
ax_loss.plot([e["step"] for e in with_loss], [e["val_loss"] for e in with_loss], "ko", label="validation loss")
ax_loss.axvline(run.stage1_steps, color="grey", ls=":")
ax_loss.set_xlabel("step")
ax_loss.set_ylabel("loss")
ax_loss.legend()
for metric in ("vqa/accuracy", "caption/bleu4"):
    points = [e for e in eval_entries if metric in e.get("accuracy", {})]
    ax_acc.plot([e["step"] for e in points], [e["accuracy"][metric] for e in points], "o-", label=metric)
ax_acc.axvline(run.stage1_steps, color="grey", ls=":")
ax_acc.set_xlabel("step")
ax_acc.set_ylim(0, 1)
ax_acc.set_title("validation")
ax_acc.legend()
plt.show()
"""),
    md("""
## 6. Where does the model look for the star?

`patch_relevance` shows which image tokens the answer depends on (gradient x input on the image
tokens; red is most relevant) for the probe question about the star, before and after: compare
where each map is red and what each model answers (fine-tuning may change where the model looks, or
only what it calls what it sees there).
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
axes[0].imshow(Image.open(probe_image), interpolation="nearest")
axes[0].set_title(probe_image.name)
for ax, (name, model) in zip(axes[1:], (("before", base), ("after", tuned))):
    explained = patch_relevance(model, probe_image, probe_question)
    ax.imshow(overlay_relevance(probe_image, explained), interpolation="nearest")
    ax.set_title(f"{name}: {explained['answer']!r}")
for ax in axes:
    ax.axis("off")
fig.suptitle(probe_question)
plt.show()
"""),
    md("""
## Next

* Use the new model in any pipeline: `fusion.pipeline("vqa", model=final)`.
* Run the same recipe from a shell: `fusion train finetune.yaml` (add `--resume` to continue a run).
* Keep the old skills sharp by mixing some of the original data into `data:` (a list of files).
"""),
]

NOTEBOOKS = {
    "image_pipelines.ipynb": IMAGE_PIPELINES,
    "video_qa.ipynb": VIDEO_QA,
    "finetune_custom_data.ipynb": FINETUNE,
}


def build(name: str) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=[cell.copy() for cell in NOTEBOOKS[name]])
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                        "language": "python"},
                         "language_info": {"name": "python"}}
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{Path(name).stem.replace('_', '-')}-{index:02d}"  # stable ids: clean diffs
    return notebook


def write_all(folder: Path = EXAMPLES_DIR) -> list[Path]:
    paths = []
    for name in NOTEBOOKS:
        path = folder / name
        nbformat.write(build(name), path)
        paths.append(path)
    return paths


def python_kernel_dir() -> str:
    """A folder holding a kernelspec `python3` that runs this very Python (put it first on JUPYTER_PATH)."""
    import json

    folder = Path(tempfile.mkdtemp(prefix="fusion-kernels-"))
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    return str(folder)


def execute(path: Path, timeout: int = 1200, save: bool = True) -> nbformat.NotebookNode:
    """Run the notebook at `path` top to bottom in the examples folder (outputs saved in place when `save`)."""
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [python_kernel_dir(), os.environ.get("JUPYTER_PATH")]))
    client = NotebookClient(notebook, kernel_name="python3", timeout=timeout, coalesce_streams=True,  # tidy progress bars
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    if save:
        nbformat.write(notebook, path)
    return notebook


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execute", action="store_true", help="write, then run every notebook, saving outputs")
    parser.add_argument("--execute-only", nargs="*", metavar="NOTEBOOK",
                        help="run these existing notebooks in place (all when none is named), without rewriting")
    args = parser.parse_args(argv)
    if args.execute_only is not None:
        paths = [EXAMPLES_DIR / Path(n).name for n in args.execute_only] or [EXAMPLES_DIR / n for n in NOTEBOOKS]
    else:
        paths = write_all()
        print("wrote", ", ".join(p.name for p in paths))
        if not args.execute:
            return 0
    for path in paths:
        start = time.perf_counter()
        execute(path)
        print(f"ran {path.name} in {time.perf_counter() - start:.0f} s (outputs saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
