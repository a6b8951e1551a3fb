"""Task pipelines on a fused model, in the shapes users know from `transformers.pipeline`.

    from pipelines import pipeline            # or: fusion.pipeline(...)
    vqa = pipeline("vqa", model="runs/shapes/final", device=-1, dtype="float32", batch_size=8)
    vqa(image="cat.png", question="what color is the shape?")   # [{"answer": "red", "score": 0.93}]
    vqa([{"image": "a.png", "question": "..."}, ...])           # [[{"answer", "score"}], ...]

    captioning = pipeline("captioning")                          # the default model shipped with fusion
    captioning("a.png")                                          # [{"generated_text": "a red circle ..."}]

    video_qa = pipeline("video-qa", model=model)                 # a FusionModel
    video_qa(video="clip.mp4", question="what moves first?", num_frames=8)

Tasks: "captioning" ("image-to-text"), "vqa" ("visual-question-answering"), "video-qa"
("video-question-answering"). Each is preprocess -> forward -> postprocess on one base class,
`Pipeline` (see `pipelines.base`); prompts are in `pipelines.prompts`.
"""
from __future__ import annotations

import difflib

from .base import GENERATION_OPTIONS, Pipeline
from .errors import DefaultModelMissingError, PipelineInputError, UnknownTaskError
from .loading import default_model_location
from .prompts import CAPTION_PROMPT, VIDEO_QA_PROMPT, VQA_PROMPT
from .tasks import CaptioningPipeline, VideoQAPipeline, VQAPipeline

#: task name -> pipeline class
TASKS: dict[str, type[Pipeline]] = {"captioning": CaptioningPipeline, "vqa": VQAPipeline, "video-qa": VideoQAPipeline}
#: the transformers-style names -> task name
TASK_ALIASES: dict[str, str] = {"image-to-text": "captioning", "visual-question-answering": "vqa",
                                "video-question-answering": "video-qa"}


def resolve_task(task: str) -> str:
    """A task name or alias (case and '_' / '-' do not matter) -> the task name; UnknownTaskError otherwise."""
    valid = ", ".join(f"{name!r} (alias {alias!r})" for alias, name in TASK_ALIASES.items())
    if not isinstance(task, str):
        raise UnknownTaskError(f"task must be a str, got a {type(task).__name__}; valid tasks: {valid}")
    key = task.strip().lower().replace("_", "-")
    key = TASK_ALIASES.get(key, key)
    if key not in TASKS:
        close = difflib.get_close_matches(key, [*TASKS, *TASK_ALIASES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(f"unknown task {task!r}{hint}; valid tasks: {valid}")
    return key


def pipeline(task: str, model=None, device=None, dtype=None, batch_size: int = 1, **kwargs) -> Pipeline:
    """A task pipeline, as `transformers.pipeline`.

    Args:
        task: "captioning" / "image-to-text", "vqa" / "visual-question-answering",
            "video-qa" / "video-question-answering".
        model: a checkpoint folder (str or os.PathLike, written by `FusionModel.save_pretrained` or
            `fusion train`), a `fusion.FusionModel`, or None (or "default") for the default model that
            ships in `fusion/default_model/`. A missing or broken folder raises `fusion.errors.CheckpointError`
            naming it; a missing default model `DefaultModelMissingError` (a CheckpointError). A given
            FusionModel keeps its train/eval mode: each call runs it in eval mode and then restores its modes.
        device: -1 (CPU), 0 (cuda:0), a string ("cpu", "cuda:1") or a torch.device. None: a loaded
            model stays on the CPU, a given FusionModel where it is. A given model is moved in place.
        dtype: a torch dtype or its name ("float32", "bfloat16"); None: a loaded model in float32, a given
            FusionModel as it is.
        batch_size: inputs per forward pass for list inputs (greedy results do not depend on it;
            sampled ones do, as the rows of a batch share one random stream).
        **kwargs: max_new_tokens, generate_kwargs (options of `fusion.generation.generate`: do_sample,
            temperature, top_k, top_p, stop_ids, generator) and the task's options (video QA:
            num_frames, fps, max_frames). Call-time values override these.

    Returns:
        a `Pipeline`; calling it gives, per input, `[{"generated_text": str}]` (captioning) or
        `[{"answer": str, "score": float}]` (VQA, video QA; score = exp(mean token log-probability)),
        and a list of those for a list of inputs.
    """
    return TASKS[resolve_task(task)](model, device=device, dtype=dtype, batch_size=batch_size, **kwargs)


__all__ = ["pipeline", "resolve_task", "Pipeline", "CaptioningPipeline", "VQAPipeline", "VideoQAPipeline", "TASKS",
           "TASK_ALIASES", "GENERATION_OPTIONS", "CAPTION_PROMPT", "VQA_PROMPT", "VIDEO_QA_PROMPT",
           "PipelineInputError", "UnknownTaskError", "DefaultModelMissingError", "default_model_location"]
