"""Writing video files (PyAV). Reading and frame sampling live in `vision.video`."""
from __future__ import annotations

import os

import numpy as np


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, codec: str = "libx264",
                crf: int = 12) -> None:
    """Write `frames` ([T, H, W, 3] uint8 RGB) to an mp4 at a constant `fps`.

    H and W must be even (yuv420p). `crf` sets the quality (lower is closer to lossless).
    """
    import av  # imported here: only writers need it

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be a uint8 array [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("write_video: no frames to write")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: height and width must be even for yuv420p, got {height}x{width}")
    from fractions import Fraction

    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
