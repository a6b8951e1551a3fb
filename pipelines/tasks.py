"""The task pipelines: captioning, visual question answering, video question answering.

Each says only how one input becomes a conversation with its media (`preprocess`, with the prompt
templates of `pipelines.prompts`) and how one generated answer becomes a result (`postprocess`);
batching, devices and argument handling are the base class's (`pipelines.base.Pipeline`).

Scores: `score = exp(mean log-probability of the generated tokens)`, the end-of-turn token that ends
the answer included (it is `FusionModel.chat`'s `logprob`). That is the geometric mean of the
per-token probabilities under the model, in (0, 1]: 1 means the model was certain of every token.
It is a confidence, not a calibrated probability of being right.
"""
from __future__ import annotations

import math
import numbers
import warnings

from fusion.processor import checked_presampled_video
from vision import VideoLoadError

from .base import Pipeline, check_positive_int
from .errors import PipelineInputError
from .prompts import CAPTION_PROMPT, VIDEO_QA_PROMPT, VQA_PROMPT, user_turn


def check_question(question, where: str) -> str:
    """A question as the prompt takes it: a non-empty str (stripped). Its text is literal: a "<image>" in it is
    text (the pipeline places the media itself)."""
    if not isinstance(question, str):
        raise PipelineInputError(f"{where}: 'question' must be a str, got a {type(question).__name__}")
    text = question.strip()
    if not text:
        raise PipelineInputError(f"{where}: 'question' is empty; ask something about the media")
    return text


def answer_result(output: dict) -> list[dict]:
    """One chat output -> [{"answer": str, "score": exp(mean logprob)}] (see the module docstring)."""
    return [{"answer": output["text"], "score": math.exp(output["logprob"])}]


class CaptioningPipeline(Pipeline):
    """Describe an image (task "captioning", alias "image-to-text").

        captioning(image)                  -> [{"generated_text": str}]
        captioning([image, image2])        -> [[{"generated_text": str}], [{"generated_text": str}]]
        captioning({"image": image}) / captioning(image=image) / captioning([{"image": ...}, ...])

    An image is a path, a PIL image, a numpy array [H, W, C] or a tensor [C, H, W] (see `vision.load_image`).
    The prompt is `pipelines.prompts.CAPTION_PROMPT`.
    """

    task = "captioning"
    input_fields = ("image",)
    default_max_new_tokens = 48

    def preprocess(self, record: dict, **options) -> dict:
        return {"conversation": user_turn(CAPTION_PROMPT), "images": [self.load_image(record["image"])]}

    def postprocess(self, output: dict) -> list[dict]:
        return [{"generated_text": output["text"]}]


class VQAPipeline(Pipeline):
    """Answer a question about an image (task "vqa", alias "visual-question-answering").

        vqa(image=image, question="what color is the circle?")  -> [{"answer": str, "score": float}]
        vqa(image, question) / vqa({"image": ..., "question": ...})
        vqa([{"image": ..., "question": ...}, ...])              -> a list of [{"answer", "score"}]
        vqa(image=[im1, im2], question="...")                   -> every image with every question, image-major

    `score` is exp(mean log-probability of the answer's tokens), in (0, 1] (see `pipelines.tasks`).
    The prompt is `pipelines.prompts.VQA_PROMPT`.
    """

    task = "vqa"
    input_fields = ("image", "question")
    default_max_new_tokens = 16

    def check_input(self, record: dict, where: str) -> dict:
        return {**record, "question": check_question(record["question"], where)}

    def preprocess(self, record: dict, **options) -> dict:
        return {"conversation": user_turn(VQA_PROMPT, question=record["question"]),
                "images": [self.load_image(record["image"])]}

    def postprocess(self, output: dict) -> list[dict]:
        return answer_result(output)


class VideoQAPipeline(Pipeline):
    """Answer a question about a video (task "video-qa", alias "video-question-answering").

        video_qa(video="clip.mp4", question="what moves first?", num_frames=8)  -> [{"answer": str, "score": float}]
        video_qa(video="clip.mp4", question="...", fps=2)                       (one frame every 0.5 s, <= max_frames)
        video_qa({"video": ..., "question": ...}) / video_qa([{...}, ...])     -> a list of result lists

    A video is a file path, or frames already sampled (`vision.sample_frames(...)`, or a
    `(frames [T, H, W, 3] uint8, timestamps in seconds)` pair). Frame sampling: `num_frames` (uniform)
    or `fps` (capped at `max_frames`; with uniform sampling a max_frames is ignored, with a warning), given
    at construction or at call time (a call's num_frames or fps replaces both construction settings); with
    neither, the model's saved video settings.
    `score` as for VQA. The prompt is `pipelines.prompts.VIDEO_QA_PROMPT`.
    """

    task = "video-qa"
    input_fields = ("video", "question")
    default_max_new_tokens = 16
    task_options = {"num_frames": None, "fps": None, "max_frames": None}

    def merge_options(self, options: dict, updates: dict, where: str) -> dict:
        updates = {k: v for k, v in updates.items() if v is not None}
        if "num_frames" in updates and "fps" in updates:
            raise PipelineInputError(f"{where}: give num_frames (uniform sampling) or fps (frames per second), "
                                     f"not both")
        for name in ("num_frames", "max_frames"):
            if name in updates:
                updates[name] = check_positive_int(updates[name], f"{where}: {name}")
        if "fps" in updates:
            fps = updates["fps"]
            if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < math.inf:
                raise PipelineInputError(f"{where}: fps must be a positive number of frames per second, got {fps!r}")
        merged = dict(options)
        if "num_frames" in updates or "fps" in updates:  # a sampling mode replaces the other one
            merged["num_frames"] = merged["fps"] = None
        merged.update(updates)
        return merged

    def check_input(self, record: dict, where: str) -> dict:
        try:
            checked_presampled_video(record["video"])
        except VideoLoadError as err:
            raise VideoLoadError(f"{where}: {err}") from None
        return {**record, "question": check_question(record["question"], where)}

    def preprocess(self, record: dict, num_frames=None, fps=None, max_frames=None) -> dict:
        settings = self.model.processor.video
        uniform = fps is None and (num_frames is not None or settings.fps is None)
        if max_frames is not None and uniform and checked_presampled_video(record["video"]) is None:
            warnings.warn(f"max_frames={max_frames} ignored: it caps fps sampling, and this video is sampled "
                          f"uniformly ({num_frames or settings.num_frames} frames); pass fps=... with it, or "
                          f"num_frames=... for fewer frames", UserWarning, stacklevel=3)
        frames = self.model.processor.sample_video(record["video"], num_frames=num_frames, fps=fps,
                                                   max_frames=max_frames)
        return {"conversation": user_turn(VIDEO_QA_PROMPT, question=record["question"]), "videos": [frames]}

    def postprocess(self, output: dict) -> list[dict]:
        return answer_result(output)
