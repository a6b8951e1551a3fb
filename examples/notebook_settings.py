"""The one place the example notebooks take their settings from: which model, and how big a run.

Environment variables (all optional):

    FUSION_NOTEBOOK_MODEL    a model folder (written by `save_pretrained` or `fusion train`);
                             default: the default model that ships in `fusion/default_model/`
    FUSION_NOTEBOOK_SMOKE=1  tiny settings: a few samples and training steps, so that a notebook runs
                             in seconds (the tests use it); the numbers it gives mean nothing
    FUSION_NOTEBOOK_WORKDIR  where the notebooks write data and training runs;
                             default: examples/runs/ (ignored by git)

    from notebook_settings import MODEL, SMOKE, MEDIA_DIR, settings
    vqa = fusion.pipeline("vqa", model=MODEL)        # MODEL is None for the default model
    run = settings("finetune")                       # run.train_images, run.stage1_steps, ...
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

# Without ipywidgets, tqdm's notebook progress bars fall back to plain text with a warning; plain text is fine.
warnings.filterwarnings("ignore", message="IProgress not found")

EXAMPLES_DIR = Path(__file__).resolve().parent
MEDIA_DIR = EXAMPLES_DIR / "media"

SMOKE: bool = os.environ.get("FUSION_NOTEBOOK_SMOKE", "").strip().lower() not in ("", "0", "false", "no")
#: a model folder, or None for the default model (what `fusion.pipeline(task, model=None)` loads)
MODEL: str | None = os.environ.get("FUSION_NOTEBOOK_MODEL") or None
WORK_DIR = Path(os.environ.get("FUSION_NOTEBOOK_WORKDIR") or EXAMPLES_DIR / "runs")

# Per notebook: the normal settings, and the tiny ones used under FUSION_NOTEBOOK_SMOKE=1.
_SETTINGS = {
    "image_pipelines": {
        "normal": {"batch_size": 4},
        "smoke": {"batch_size": 2},
    },
    "video_qa": {
        "normal": {"num_frames": 8, "fps": 2.0},
        "smoke": {"num_frames": 8, "fps": 2.0},
    },
    "finetune": {
        # 60 + 120 steps of 32 samples: 2.6 min on a 2-core CPU with native bf16 (bf16 autocast), 3.9-5.3 min on
        # a 2-core AVX2 CPU (float32). The committed outputs of finetune_custom_data.ipynb (written by
        # `python examples/make_notebooks.py --execute` on the default model; trained in 3.9 min in float32 on a
        # 2-core AVX2 CPU), measured on the 78 of the 120 test images whose layout no training image shows
        # (test_unseen.jsonl): test VQA accuracy 0.825 -> 0.919, "shape" questions (stars) 0.744 -> 1.000,
        # caption CIDEr 6.38 -> 9.87;
        # the sample media (no stars) go from 12 of 12 right to 10 of 12: fine-tuning forgot a little.
        "normal": {"train_images": 600, "val_images": 40, "test_images": 120, "eval_limit": None, "val_limit": 120,
                   "stage1_steps": 60, "stage2_steps": 120, "batch_size": 32, "eval_batch_size": 32,
                   "eval_every": 0, "log_every": 5},
        "smoke": {"train_images": 8, "val_images": 2, "test_images": 4, "eval_limit": 12, "val_limit": 4,
                  "stage1_steps": 2, "stage2_steps": 2, "batch_size": 4, "eval_batch_size": 8,
                  "eval_every": 0, "log_every": 1},
    },
}


def settings(notebook: str) -> SimpleNamespace:
    """The size settings of `notebook` ("image_pipelines", "video_qa", "finetune") for this run."""
    if notebook not in _SETTINGS:
        raise KeyError(f"no settings for {notebook!r}; known: {sorted(_SETTINGS)}")
    return SimpleNamespace(**_SETTINGS[notebook]["smoke" if SMOKE else "normal"])


def describe() -> str:
    """One line saying which model and which settings this run uses."""
    which = f"model folder {MODEL}" if MODEL else "the default model that ships with fusion"
    mode = "SMOKE settings (tiny, for tests: the numbers mean nothing)" if SMOKE else "normal settings"
    return f"{which}; {mode}"


def media_manifest() -> dict:
    """The sample media and their true answers (examples/media/media.json)."""
    return json.loads((MEDIA_DIR / "media.json").read_text())


def build_stand_in_model(folder, seed: int = 0) -> Path:
    """Save an untrained tiny model with the default model's input settings to `folder` (for smoke tests
    while no trained model is at hand): 64-pixel images, 8x8 patches -> 4x4 image tokens, 8-frame videos,
    and a tokenizer that knows the shapes world's words. Its answers are nonsense. Returns the folder."""
    import torch

    import fusion
    from fusion.data.shapes_world import ShapesWorldConfig, text_corpus
    from tokenizer import FusionTokenizer
    from vision import VisionEncoderConfig

    corpus = text_corpus(ShapesWorldConfig(shapes=("circle", "square", "triangle", "star"),
                                           colors=("red", "green", "blue", "yellow", "purple"), text_samples=200))
    texts = [turn["content"] for sample in corpus for turn in sample["conversations"]]
    tokenizer = FusionTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(seed)
    config = fusion.FusionConfig(
        decoder=fusion.DecoderConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, head_dim=16, intermediate_size=64, intermediate_size_mlp=96,
                                     num_experts=2, attention_chunk_size=256),
        vision=VisionEncoderConfig(image_size=64, patch_size=8, width=32, layers=1, heads=2),
        adapter_hidden_size=64)
    model = fusion.FusionModel(config, tokenizer)
    model.save_pretrained(folder)
    return Path(folder)
