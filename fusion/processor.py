"""`FusionProcessor`: one conversation with its images and videos -> model inputs.

The same path serves training (labels on assistant content) and inference (a generation prompt), so
what a model sees at test time is rendered exactly as what it learned from:

    images  --ImageProcessor-->  tiles [n, 3, S, S] + grid  --> ImagePlaceholder(tokens_per_tile, grid)
    videos  --sample_frames -->  frames + timestamps        --> one tile per frame + VideoPlaceholder
    messages + placeholders --tokenizer--> input_ids (one <|patch|> per image feature), labels

`pixel_values` holds the tiles of every image and frame in the order their placeholders appear in
`input_ids`, which is the order the fused model writes their features into the sequence.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from tokenizer import FusionTokenizer, ImagePlaceholder, VideoPlaceholder
from tokenizer.chat import media_in_parts
from tokenizer.errors import MediaCountMismatchError
from vision.errors import ImageLoadError, VideoLoadError
from vision.image import ImageProcessor
from vision.video import SampledFrames, check_sampling_arguments, sample_frames

CHAT_FORMAT = "llama4"  # the chat template fusion writes and reads (tokenizer/chat.py), saved with a model


def checked_presampled_video(video) -> SampledFrames | tuple | None:
    """`video` if it holds frames already sampled (`SampledFrames`, or a `(frames, timestamps)` pair with one
    timestamp per frame and at least one frame), None if it is a path; VideoLoadError for anything else."""
    if isinstance(video, (str, os.PathLike)):
        return None
    if isinstance(video, SampledFrames):
        return video
    if isinstance(video, tuple) and len(video) == 2:
        frames, timestamps = video
        if len(frames) == 0 or len(frames) != len(timestamps):
            raise VideoLoadError(f"sampled frames need one timestamp per frame and at least one frame, got "
                                 f"{len(frames)} frame(s) and {len(timestamps)} timestamp(s)")
        return video
    raise VideoLoadError(f"cannot read a video from a {type(video).__name__}; pass a video file path, or frames "
                         f"already sampled (vision.sample_frames(...), or a (frames [T, H, W, 3], timestamps) tuple)")


def _listed_or_in_parts(given, carried: list, kind: str, sample_id: Any = None):
    """The media of one kind: `given` (None: none), or when it is empty, those its typed parts carry
    (`carried`, from `media_in_parts`) if every such part carries one."""
    if given is None:
        given = ()
    if not (isinstance(given, (list, tuple)) and not given) or not carried:
        return given
    missing = [index + 1 for index, item in enumerate(carried) if item is None]
    if not missing:
        return list(carried)
    if len(missing) < len(carried):
        sample = "" if sample_id is None else f"sample {sample_id!r}: "
        raise MediaCountMismatchError(
            f"{sample}{kind} part(s) {missing} (counting the {{'type': '{kind}'}} parts of the conversation from 1) "
            f"carry no {kind} while others do; give every {{'type': '{kind}'}} part its {kind} "
            f"({{'type': '{kind}', '{kind}': ...}}), or pass all of them, in order, as {kind}s=[...]")
    return given


@dataclass
class VideoSettings:
    """How frames are sampled from a video: uniform `num_frames`, or `fps` capped at `max_frames`."""

    num_frames: int = 8
    fps: float | None = None
    max_frames: int = 32

    def __post_init__(self):
        try:  # (at the model's construction, not at each video a training run would then skip as bad)
            check_sampling_arguments(num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames)
        except VideoLoadError as err:
            raise ValueError(f"VideoSettings: {err}") from None


@dataclass
class ProcessedSample:
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor | None  # [T] long, -100 where not supervised; None for a generation prompt
    pixel_values: torch.Tensor | None  # [n_tiles, 3, S, S], tiles in placeholder order; None without media
    sample_id: Any = None
    frame_timestamps: list[list[float]] | None = None  # per video, the seconds of its sampled frames
    positions: torch.Tensor | None = None  # [T] only for shared-prefix samples (see data.collate.share_prefix)
    branch_ids: torch.Tensor | None = None  # [T] 0 = shared prefix, k = the k-th branch


@dataclass
class ProcessedMedia:
    """The images and videos of a conversation, processed once (`FusionProcessor.process_media`), so that
    several conversations about the same media (grouped questions) need not decode them again."""

    image_tiles: list[torch.Tensor]
    image_placeholders: list[ImagePlaceholder]
    video_tiles: list[torch.Tensor]
    video_placeholders: list[VideoPlaceholder]
    timestamps: list[list[float]]


class FusionProcessor:
    def __init__(self, tokenizer: FusionTokenizer, image_processor: ImageProcessor, tokens_per_tile: int,
                 video: VideoSettings | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens_per_tile = tokens_per_tile
        self.video = video or VideoSettings()

    @property
    def frame_processor(self) -> ImageProcessor:
        """The image processor of video frames: `image_processor`'s settings as they are now (they are what a
        saved model keeps), with one tile per frame (no Llama 4 tiling per frame)."""
        return ImageProcessor(**{**self.image_processor.to_dict(), "max_tiles": 1})

    def to_dict(self) -> dict:
        return {"image_processor": self.image_processor.to_dict(), "video": asdict(self.video),
                "tokens_per_tile": self.tokens_per_tile, "chat_format": CHAT_FORMAT}

    def sample_video(self, video, num_frames: int | None = None, fps: float | None = None,
                     max_frames: int | None = None) -> SampledFrames | tuple:
        """A path -> sampled frames with this processor's settings (overridable); frames already sampled pass
        through as they are (with a warning if sampling options were given for them)."""
        presampled = checked_presampled_video(video)
        if presampled is not None:
            given = [f"{k}={v!r}" for k, v in (("num_frames", num_frames), ("fps", fps), ("max_frames", max_frames))
                     if v is not None]
            if given:
                frames, _ = presampled
                warnings.warn(f"{', '.join(given)} ignored: the video was given as {len(frames)} frames "
                              f"already sampled, which are used as they are (pass the file's path to sample it)",
                              UserWarning, stacklevel=3)
            return presampled
        use_fps = fps if fps is not None else (self.video.fps if num_frames is None else None)
        return sample_frames(video, num_frames=self.video.num_frames if num_frames is None else num_frames,
                             fps=use_fps, max_frames=self.video.max_frames if max_frames is None else max_frames)

    def process_media(self, images: Sequence = (), videos: Sequence = (), *, num_frames: int | None = None,
                      fps: float | None = None) -> ProcessedMedia:
        """Load, tile and normalise `images`; sample and normalise the frames of `videos` (None: none)."""
        images = () if images is None else images
        videos = () if videos is None else videos
        for name, items, error in (("images", images, ImageLoadError), ("videos", videos, VideoLoadError)):
            if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Sequence):
                raise error(f"{name} must be a list (one entry per <{name[:-1]}> of the conversation, in order), "
                            f"got a {type(items).__name__}: pass [{name[:-1]}] for one")
        media = ProcessedMedia([], [], [], [], [])
        for image in images:
            pixels, grid = self.image_processor(image)
            media.image_tiles.append(pixels)
            media.image_placeholders.append(ImagePlaceholder(tokens_per_tile=self.tokens_per_tile, grid=grid))
        frame_processor = self.frame_processor
        for video in videos:
            frames, seconds = self.sample_video(video, num_frames=num_frames, fps=fps)
            media.video_tiles.append(torch.cat([frame_processor(frame)[0] for frame in frames]))
            media.video_placeholders.append(VideoPlaceholder(timestamps=seconds,
                                                             tokens_per_frame=self.tokens_per_tile))
            media.timestamps.append([float(s) for s in seconds])
        return media

    def __call__(self, messages: Sequence[dict], images: Sequence = (), videos: Sequence = (), *,
                 add_generation_prompt: bool = False, sample_id: Any = None, num_frames: int | None = None,
                 fps: float | None = None, media: ProcessedMedia | None = None) -> ProcessedSample:
        """Encode one conversation. `images`: paths, PIL images, arrays or tensors; `videos`: paths, or
        already-sampled `(frames, timestamps)`; None or empty: none, or those the typed parts of that kind carry
        (`{"type": "image", "image": ...}`). `media`: those already processed by `process_media`
        (then `images` and `videos` are ignored)."""
        if media is None:
            # a kind with no media list: what its typed parts carry, as Hugging Face processors take them (and
            # as a dataset record without an "images" / "videos" list does, each kind on its own)
            in_images, in_videos = media_in_parts(messages)
            images = _listed_or_in_parts(images, in_images, "image", sample_id)
            videos = _listed_or_in_parts(videos, in_videos, "video", sample_id)
            media = self.process_media(images, videos, num_frames=num_frames, fps=fps)
        encoded = self.tokenizer.encode_conversation(messages, images=media.image_placeholders,
                                                     videos=media.video_placeholders,
                                                     sample_id=sample_id,
                                                     add_generation_prompt=add_generation_prompt)
        ordered = []
        next_image, next_video = iter(media.image_tiles), iter(media.video_tiles)
        for kind in encoded.media_order:
            ordered.append(next(next_image) if kind == "image" else next(next_video))
        return ProcessedSample(
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            labels=None if encoded.labels is None else torch.tensor(encoded.labels, dtype=torch.long),
            pixel_values=(ordered[0] if len(ordered) == 1 else torch.cat(ordered)) if ordered else None,
            sample_id=sample_id,
            frame_timestamps=media.timestamps or None,
        )
