"""Reading a video file and sampling frames from it.

Two sampling modes, both computed by the pure function `frame_indices` before any frame is
decoded:

* uniform (``fps=None``): split the frame range into ``num_frames`` equal segments and take
  the frame that contains each segment's midpoint;
* fps (``fps=`` given): take the range's first frame, then one frame every ``1 / fps``
  seconds; if that gives more than ``max_frames`` frames, keep ``max_frames`` of them, chosen
  by the same midpoint-of-equal-segments rule over the fps-sampled list.

A frame's timestamp is ``index / avg_fps`` seconds (its presentation time in a constant-rate
video). It is *not* ``index / step``: that common bug gives sample numbers, not seconds.

Variable-frame-rate files (phones record them) have no such rate: their average rate puts a
frame's ``index / avg_fps`` seconds away from when it is shown. When a frame's presentation time
(from the file) is more than half a frame period off that grid, the file is read by its
presentation times instead (`frame_indices_at_times`): the same two modes in seconds, and each
frame's timestamp is its presentation time, counted from the first frame.

`sample_frames` opens the file, asks the backend for the frame count and average frame rate,
computes the indices and decodes only those frames. decord is the default backend; PyAV is
used where decord is not installed (its wheels exist only for some platforms), when
``backend="pyav"`` is asked, or, with the default backend, when decord cannot open or decode a
file (it fails on some valid ones, e.g. some frame widths). Both backends count frames the same
way (the video packets the file holds), so they return the same indices for the same file, and
both turn frames upright as the file's rotation metadata (display matrix) says, as players do.
"""
from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from vision.checks import is_finite_number, is_whole_number
from vision.errors import VideoLoadError, url_hint

# Files of these kinds hold one picture: given as a video they are a mistake (video QA on one repeated frame)
STILL_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")

__all__ = ["SampledFrames", "frame_indices", "frame_indices_at_times", "sample_frames"]

PathLike = Union[str, "os.PathLike[str]"]

BACKENDS = ("decord", "pyav")

# Given (total frame count, average fps, each frame's presentation time in seconds from the first or None),
# returns the frame indices to decode and their timestamps.
FrameChooser = Callable[[int, float, Optional["list[float]"]], "tuple[list[int], list[float]]"]

# A reported average frame rate outside (0, MAX_PLAUSIBLE_FPS] is treated as broken metadata
# (variable-frame-rate files sometimes report their time base, e.g. 90000, as a rate).
MAX_PLAUSIBLE_FPS = 1000.0

# Seconds are converted to frame positions with this slack, so that e.g. start=0.7 at 10 fps
# (7.000000000000001 in floating point) starts at frame 7, not 8.
_TIME_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class SampledFrames:
    """Frames sampled from a video, with where they came from.

    Unpacks as ``frames, timestamps = sample_frames(...)`` (iteration yields exactly those
    two), while ``.indices``, ``.avg_fps`` and ``.total_frames`` stay available by name.
    A plain 3-tuple or NamedTuple would break that two-value unpacking; a dict would lose it.

    Attributes:
        frames: uint8 RGB array ``[T, H, W, 3]``, in increasing time order.
        timestamps: seconds of each frame from the first frame of the video: ``index / avg_fps``,
            or its presentation time in a variable-frame-rate file.
        indices: the frame numbers (0-based, in presentation order), strictly increasing.
        avg_fps: the video's average frame rate (the one used for the timestamps of a constant-rate file).
        total_frames: number of frames in the whole video (before any start/end trim).
    """

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    timestamps: list[float]
    indices: list[int]
    avg_fps: float
    total_frames: int

    def __iter__(self) -> Iterator[Union[np.ndarray, list[float]]]:
        yield self.frames
        yield self.timestamps


# --------------------------------------------------------------------------- indices (pure)


def frame_indices(num_total_frames: int, avg_fps: float, num_frames: int = 8, fps: Optional[float] = None,
                  max_frames: int = 32, start: Optional[float] = None, end: Optional[float] = None) -> list[int]:
    """The frame numbers to decode: sorted, unique, within ``[0, num_total_frames)``.

    The range is the frames whose timestamp ``i / avg_fps`` lies in ``[start, end)`` seconds
    (``start`` defaults to 0, ``end`` to the video's duration ``num_total_frames / avg_fps``).

    Uniform mode (``fps is None``): the range of ``L`` frames is cut into ``num_frames`` equal
    segments; segment ``j`` spans ``[j·L/n, (j+1)·L/n)`` and contributes the frame containing
    its midpoint. If the range has no more than ``num_frames`` frames, every frame is
    returned once (no duplicates, so fewer than ``num_frames``). ``max_frames`` is not used.

    fps mode: the range's first frame, then every ``avg_fps / fps`` frames (one per
    ``1 / fps`` seconds; rates above ``avg_fps`` give every frame once). If that is more than
    ``max_frames`` frames, the uniform rule above picks ``max_frames`` of them. ``num_frames``
    is not used.

    Worked example: 60 frames at 10 fps, ``num_frames=8`` → segments of 7.5 frames, midpoints
    3.75, 11.25, … → ``[3, 11, 18, 26, 33, 41, 48, 56]``; ``fps=2`` → ``[0, 5, 10, …, 55]``.

    ``end`` may pass the video's end by at most one frame period (container durations are
    often rounded up); further is an error, as is a range holding no frame.

    Raises:
        VideoLoadError: bad arguments, or a range outside the video.
    """
    check_sampling_arguments(num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
    if not is_whole_number(num_total_frames) or num_total_frames < 1:
        raise VideoLoadError(f"the video has {num_total_frames} frames; at least one is needed")
    if not _is_positive_number(avg_fps):
        raise VideoLoadError(f"avg_fps must be a positive number, got {avg_fps!r}")

    first, stop = _frame_range(num_total_frames, avg_fps, start, end)
    if fps is None:
        return [first + offset for offset in _midpoints_of_segments(stop - first, num_frames)]

    frames_per_sample = avg_fps / fps
    num_samples = math.ceil((stop - first) / frames_per_sample - _TIME_TOLERANCE)
    offsets = sorted({math.floor(m * frames_per_sample + _TIME_TOLERANCE) for m in range(num_samples)})
    offsets = [offset for offset in offsets if offset < stop - first]
    if len(offsets) > max_frames:
        offsets = [offsets[position] for position in _midpoints_of_segments(len(offsets), max_frames)]
    return [first + offset for offset in offsets]


def check_sampling_arguments(num_frames: int = 8, fps: Optional[float] = None, max_frames: int = 32,
                             start: Optional[float] = None, end: Optional[float] = None) -> None:
    """Check the arguments that need no video; raise `VideoLoadError` saying what to pass."""
    if not is_whole_number(num_frames) or num_frames < 1:
        raise VideoLoadError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if not is_whole_number(max_frames) or max_frames < 1:
        raise VideoLoadError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    if fps is not None and not _is_positive_number(fps):
        raise VideoLoadError(f"fps must be a positive number of frames per second (or None for uniform "
                             f"sampling), got {fps!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not is_finite_number(value):
            raise VideoLoadError(f"{name} must be a number of seconds or None, got {value!r}")
    if start is not None and start < 0:
        raise VideoLoadError(f"start must be >= 0 seconds, got {start!r}")
    if end is not None and end <= 0:
        raise VideoLoadError(f"end must be > 0 seconds, got {end!r}")
    if start is not None and end is not None and start >= end:
        raise VideoLoadError(f"start ({start!r} s) must be before end ({end!r} s)")


def _frame_range(num_total_frames: int, avg_fps: float, start: Optional[float],
                 end: Optional[float]) -> tuple[int, int]:
    """``[first, stop)``: the frames whose timestamp lies in ``[start, end)`` seconds."""
    duration = num_total_frames / avg_fps
    if start is not None and start >= duration:
        raise VideoLoadError(f"start={start!r} s is at or after the end of the video ({duration:.3f} s, "
                             f"{num_total_frames} frames at {avg_fps:g} fps); pass a start before {duration:.3f}")
    if end is not None and end > duration + 1.0 / avg_fps + _TIME_TOLERANCE:
        raise VideoLoadError(f"end={end!r} s is past the end of the video ({duration:.3f} s, "
                             f"{num_total_frames} frames at {avg_fps:g} fps); pass end=None to read to the end")
    first = 0 if start is None else math.ceil(start * avg_fps - _TIME_TOLERANCE)
    stop = num_total_frames if end is None else min(num_total_frames, math.ceil(end * avg_fps - _TIME_TOLERANCE))
    if stop <= first:
        raise VideoLoadError(f"no frame has a timestamp in [{start!r}, {end!r}) s at {avg_fps:g} fps "
                             f"(frames are {1.0 / avg_fps:.4f} s apart); widen the range")
    return first, stop


def is_constant_rate(times: Sequence[float], avg_fps: float) -> bool:
    """Whether every frame is shown within half a frame period of ``index / avg_fps`` seconds."""
    grid = np.arange(len(times)) / avg_fps
    return bool(np.all(np.abs(np.asarray(times, dtype=float) - grid) <= 0.5 / avg_fps))


def frame_indices_at_times(times: Sequence[float], num_frames: int = 8, fps: Optional[float] = None,
                           max_frames: int = 32, start: Optional[float] = None,
                           end: Optional[float] = None) -> list[int]:
    """`frame_indices` for a variable-frame-rate video, on its frames' presentation times.

    ``times`` are the seconds at which each frame is shown, from the first frame (non-decreasing).
    The video ends one typical frame period (the median gap between frames) after its last frame (a
    last frame held on screen for longer counts as one period: decord and PyAV read its end differently).
    The range is the frames whose time lies in ``[start, end)``; its span runs from its first
    frame's time to its last frame's end (the next frame's time, but no later than ``end`` or one
    period after the frame), and the frame *shown* at a time ``t`` of the span is the last frame
    whose time is not after ``t``.

    Uniform mode: the span is cut into ``num_frames`` equal segments, and segment ``j`` contributes
    the frame shown at its midpoint. Where a frame is held across several midpoints it is taken
    once and the frames nearest in time to the other midpoints fill their places (the increasing
    choice of distinct frames whose total distance in time to the midpoints is least), so the range
    always gives ``num_frames`` frames, or each of its frames once if it has no more. fps mode: the
    frames shown at the span's start and every ``1 / fps`` seconds after it, each once (a held frame
    gives fewer); if that is more than ``max_frames``, the midpoint rule of `frame_indices` picks
    ``max_frames`` of them. On a constant-rate video of two or more frames both modes choose what
    `frame_indices` chooses (a single frame has no period to end it: it lasts a second here).

    Raises:
        VideoLoadError: bad arguments, or a range outside the video.
    """
    check_sampling_arguments(num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
    times = [float(t) for t in times]
    if not times:
        raise VideoLoadError("the video has 0 frames; at least one is needed")
    gaps = np.diff(times)
    if np.any(gaps < 0) or not all(math.isfinite(t) for t in times):
        raise VideoLoadError("the frames' presentation times are not in order; re-encode the video, e.g. "
                             "`ffmpeg -i IN -r 30 -c:v libx264 OUT.mp4`")
    median_gap = float(np.median(gaps)) if len(times) > 1 else 0.0
    period = median_gap if median_gap > 0 else 1.0
    duration = times[-1] + period
    if start is not None and start >= duration:
        raise VideoLoadError(f"start={start!r} s is at or after the end of the video ({duration:.3f} s); "
                             f"pass a start before {duration:.3f}")
    if end is not None and end > duration + period + _TIME_TOLERANCE:
        raise VideoLoadError(f"end={end!r} s is past the end of the video ({duration:.3f} s); pass end=None "
                             f"to read to the end")
    slack = _TIME_TOLERANCE * period  # as `frame_indices`'s slack of a millionth of a frame
    first = 0 if start is None else bisect.bisect_left(times, start - slack)
    stop = len(times) if end is None else bisect.bisect_left(times, end - slack)
    if stop <= first:
        raise VideoLoadError(f"no frame has a timestamp in [{start!r}, {end!r}) s; widen the range")
    t0, t1 = times[first], (times[stop] if stop < len(times) else duration)
    if end is not None:  # the range's last frame counts until `end` (or one period), not through a hold after it
        t1 = min(t1, max(end, times[stop - 1] + period))

    def shown(t: float) -> int:
        return min(stop - 1, max(first, bisect.bisect_right(times, t + slack) - 1))

    if fps is None:
        if stop - first <= num_frames:
            return list(range(first, stop))
        midpoints = [t0 + (2 * j + 1) * (t1 - t0) / (2 * num_frames) for j in range(num_frames)]
        chosen = [shown(t) for t in midpoints]
        if len(set(chosen)) == num_frames:  # always so at a constant rate
            return chosen
        return [first + i for i in _distinct_frames_nearest(times[first:stop], t1, midpoints, chosen, first)]
    num_samples = math.ceil((t1 - t0) * fps - _TIME_TOLERANCE)
    chosen = sorted({shown(t0 + m / fps) for m in range(num_samples)})
    if len(chosen) > max_frames:
        chosen = [chosen[position] for position in _midpoints_of_segments(len(chosen), max_frames)]
    return chosen


def _distinct_frames_nearest(times: Sequence[float], end: float, targets: Sequence[float],
                             shown: Sequence[int], offset: int) -> list[int]:
    """Positions ``i_0 < i_1 < ...`` in ``range(len(times))``, one per target time, that minimise the sum over
    targets of the distance from target ``j`` to the interval in which frame ``i_j`` is on screen
    (``[times[i], times[i + 1])``, the last one until ``end``). The frame shown at the target
    (``shown[j] - offset``) costs nothing, any other at least a hair more than its distance, so where the shown
    frames all differ they are the choice. A dynamic programme over the targets: O(targets x frames)."""
    begin = np.asarray(times, dtype=float)
    finish = np.append(begin[1:], end)
    length, count = len(begin), len(targets)
    positions = np.arange(length)
    best, back = None, []  # best[i]: least cost of targets 0..j with target j at position i
    for j, (target, at) in enumerate(zip(targets, shown)):
        cost = np.maximum(begin - target, 0.0) + np.maximum(target - finish, 0.0) + 1e-9
        cost[at - offset] = 0.0
        if best is not None:  # the cheapest earlier choice at a position before i
            prefix_min = np.minimum.accumulate(best)
            new_min = np.concatenate(([True], best[1:] < prefix_min[:-1]))
            prefix_arg = np.maximum.accumulate(np.where(new_min, positions, 0))
            cost = np.concatenate(([np.inf], cost[1:] + prefix_min[:-1]))
            back.append(np.concatenate(([0], prefix_arg[:-1])))
        cost[(positions < j) | (positions > length - count + j)] = np.inf  # room for the targets before / after
        best = cost
    position = int(np.argmin(best))
    chosen = [position]
    for step in reversed(back):
        position = int(step[position])
        chosen.append(position)
    return chosen[::-1]


def _midpoints_of_segments(length: int, count: int) -> list[int]:
    """Positions in ``range(length)`` of the midpoints of ``count`` equal segments.

    Every position once if ``length <= count``. Integer arithmetic: segment ``j``'s midpoint is
    ``(2j+1)·length / (2·count)`` and the position containing it is its floor; when
    ``length > count`` consecutive midpoints are more than one apart, so positions are unique.
    """
    if length <= count:
        return list(range(length))
    return [(2 * j + 1) * length // (2 * count) for j in range(count)]


def resolve_avg_fps(reported_fps: Optional[float], num_total_frames: int, duration_s: Optional[float],
                    path: PathLike = "<video>") -> float:
    """The frame rate to use for timestamps: the reported one if plausible, else frames / duration.

    Plausible means finite and in ``(0, MAX_PLAUSIBLE_FPS]``. Raises `VideoLoadError` when
    neither the reported rate nor ``num_total_frames / duration_s`` is plausible.
    """
    if _is_plausible_fps(reported_fps):
        return float(reported_fps)
    if duration_s is not None and is_finite_number(duration_s) and duration_s > 0:
        measured = num_total_frames / duration_s
        if _is_plausible_fps(measured):
            return float(measured)
    raise VideoLoadError(f"{os.fspath(path)}: cannot tell the frame rate (reported {reported_fps!r} fps, "
                         f"{num_total_frames} frames over a duration of {duration_s!r} s). Re-encode it at a "
                         f"constant rate, e.g. `ffmpeg -i IN -r 30 -c:v libx264 OUT.mp4`")


def _is_positive_number(value: object) -> bool:
    return is_finite_number(value) and value > 0


def _is_plausible_fps(value: object) -> bool:
    return _is_positive_number(value) and value <= MAX_PLAUSIBLE_FPS


# --------------------------------------------------------------------------- reading


def sample_frames(path: PathLike, num_frames: int = 8, fps: Optional[float] = None, max_frames: int = 32,
                  start: Optional[float] = None, end: Optional[float] = None,
                  backend: Optional[str] = None) -> SampledFrames:
    """Sample frames from the video at ``path``; see `frame_indices` for the two modes.

    Args:
        path: a local video file.
        num_frames: uniform mode: how many frames (each frame of the range once if it has fewer).
        fps: frames per second for fps mode; None for uniform mode.
        max_frames: fps mode: the most frames returned.
        start, end: optional range in seconds, ``[start, end)`` on frame timestamps.
        backend: None (decord if installed, else PyAV; PyAV also when decord cannot open or decode
            the file), ``"decord"`` or ``"pyav"``.

    Returns:
        `SampledFrames`: unpacks as ``frames, timestamps``; also has ``.indices``,
        ``.avg_fps`` and ``.total_frames``.

    Raises:
        VideoLoadError: missing, unreadable or empty file (with the default backend: one that neither
            decord nor PyAV can read), or bad arguments.
        ImportError: ``backend="decord"`` where decord is not installed.
    """
    shown = os.fspath(path)
    if backend is not None and backend not in BACKENDS:
        raise VideoLoadError(f"{shown}: unknown video backend {backend!r}; use None, 'decord' or 'pyav'")
    try:
        check_sampling_arguments(num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
    except VideoLoadError as err:
        raise VideoLoadError(f"{shown}: {err}") from None
    if not shown:
        raise VideoLoadError("the video path is an empty string; pass the path of a video file")
    if not os.path.exists(shown):
        hint = url_hint(shown)
        raise VideoLoadError(f"{shown}: no such file" + (hint or f" (working directory {os.getcwd()}); check the path"))
    if not os.path.isfile(shown):
        raise VideoLoadError(f"{shown}: not a file; pass the path of a video file")
    if shown.lower().endswith(STILL_IMAGE_SUFFIXES):
        raise VideoLoadError(f"{shown}: an image file, not a video; pass it as an image (fusion.pipeline('vqa') "
                             f"with image=..., model.chat(..., images=[[...]]), a dataset record's \"images\" with "
                             f"<image> in its text)")

    def choose_frames(num_total_frames: int, avg_fps: float, times: Optional[list[float]]):
        try:
            if times is None or is_constant_rate(times, avg_fps):
                indices = frame_indices(num_total_frames, avg_fps, num_frames=num_frames, fps=fps,
                                        max_frames=max_frames, start=start, end=end)
                return indices, [index / avg_fps for index in indices]
            indices = frame_indices_at_times(times, num_frames=num_frames, fps=fps, max_frames=max_frames,
                                             start=start, end=end)
            return indices, [times[index] for index in indices]
        except VideoLoadError as err:
            raise VideoLoadError(f"{shown}: {err}") from None

    if backend == "pyav":
        return _sample_with_pyav(shown, choose_frames)
    try:
        decord = _import_decord()
    except ImportError as err:
        if backend == "decord":
            raise ImportError(f"backend='decord' was asked for {shown}, but decord cannot be imported ({err}). "
                              f"Install it (`pip install decord`, Linux x86_64/Windows only) or pass "
                              f"backend='pyav'") from err
        return _sample_with_pyav(shown, choose_frames)
    if backend == "decord":
        return _sample_with_decord(decord, shown, choose_frames)
    try:
        return _sample_with_decord(decord, shown, choose_frames)
    except _DecordFailure as decord_failure:  # decord fails on some valid files: PyAV may read it
        try:
            return _sample_with_pyav(shown, choose_frames)
        except VideoLoadError as pyav_error:
            raise VideoLoadError(f"{pyav_error} (decord, tried first, failed too: {decord_failure.reason})") \
                from pyav_error


class _DecordFailure(VideoLoadError):
    """decord could not open or decode a file; ``reason`` says how, without the advice."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}; this may be a limitation of decord, which fails on some valid files "
                         f"(e.g. some frame widths): try backend='pyav'. Otherwise {_UNREADABLE_HINT}")
        self.reason = reason


_UNREADABLE_HINT = ("it may be empty, corrupt, truncated or not a video; check that it plays (e.g. `ffprobe FILE`) "
                    "or re-encode it (e.g. `ffmpeg -i FILE -c:v libx264 OUT.mp4`)")


def _import_decord():
    """Import decord, loading torch first: in the other order their OpenMP runtimes clash."""
    import torch  # noqa: F401  (must come first, see above)
    import decord

    return decord


def _sample_with_decord(decord, path: str, choose_frames: FrameChooser) -> SampledFrames:
    """Open a reader for this call only, read one sorted batch, then drop the reader."""
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # decord raises RuntimeError or its own DECORDError, from C++
        if "video stream" in str(err):
            raise VideoLoadError(f"{path}: has no video stream (an audio-only or empty file?); "
                                 f"pass a file with video frames") from err
        raise _DecordFailure(path, f"decord cannot open it ({_first_line(err)})") from err
    try:
        total_frames = len(reader)
        if total_frames < 1:
            raise VideoLoadError(f"{path}: the video has no frames; pass a file with video frames")

        try:  # [start, end] seconds of each frame, from its pts
            stamps = np.asarray(reader.get_frame_timestamp(list(range(total_frames))), dtype=float)
            duration_s = float(stamps[-1, 1])  # the end of the last frame: used if the reported rate is broken
            times = [round(t, 6) for t in (stamps[:, 0] - stamps[0, 0]).tolist()]  # decord keeps float32
            hidden = int(np.sum(stamps[:, 0] < -1e-6))
        except Exception:  # broken timestamps: resolve_avg_fps reports it if the rate is broken too
            duration_s, times, hidden = None, None, 0
        if hidden:  # decord counts them and their times, but its frame 0 is the first frame shown
            raise _DecordFailure(path, f"the file's edit list hides its first {hidden} frames, which decord "
                                       f"counts but does not show")
        avg_fps = resolve_avg_fps(reader.get_avg_fps(), total_frames, duration_s, path)
        indices, timestamps = choose_frames(total_frames, avg_fps, times)
        try:
            batch = reader.get_batch(indices)
        except Exception as err:
            raise _DecordFailure(path, f"decord failed to decode {len(indices)} frames between {indices[0]} "
                                       f"and {indices[-1]} ({_first_line(err)})") from err
        # decord.bridge may have been switched to torch by other code; np.asarray covers that.
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    finally:
        del reader  # large videos grow decord's memory while a reader lives
    return _result(frames, indices, timestamps, avg_fps, total_frames, path)


def _sample_with_pyav(path: str, choose_frames: FrameChooser) -> SampledFrames:
    """Decode sequentially from the start, keep only the wanted frames, stop after the last.

    The frame count is the number of video packets the file really holds, counted without
    decoding them, as decord does when it opens a file. The header's ``stream.frames`` is not
    used: some containers (Matroska, WebM) leave it 0, and in a file cut short it counts
    frames that are no longer there, where decord counts only those that are. The packets' pts,
    sorted, are the frames' presentation times (packets come in decode order). Each frame is
    turned upright by its display matrix (`_quarter_turns`), as decord does.
    """
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoLoadError(f"{path}: has no video stream (an audio-only or empty file?); "
                                     f"pass a file with video frames")
            stream = container.streams.video[0]
            reported = float(stream.average_rate) if stream.average_rate else None
            if stream.duration and stream.time_base:
                duration_s = float(stream.duration * stream.time_base)
            elif container.duration:
                duration_s = container.duration / av.time_base
            else:
                duration_s = None
            total_frames, pts = 0, []
            for packet in container.demux(stream):
                if packet.is_corrupt:  # e.g. the last packet of a file cut short; decord fails here too
                    raise VideoLoadError(f"{path}: video packet {total_frames} is damaged; {_UNREADABLE_HINT}")
                # the final flush packet is empty; frames an edit list hides (a cut without re-encoding keeps
                # the frames before the cut that later ones are decoded from) are decoded but never shown
                if packet.size > 0 and not packet.is_discard:
                    total_frames += 1
                    pts.append(packet.pts)
            time_base = float(stream.time_base) if stream.time_base else None
    except VideoLoadError:
        raise
    except Exception as err:  # av.FFmpegError and friends (InvalidDataError, EOFError, ...)
        raise VideoLoadError(f"{path}: PyAV cannot open it ({_first_line(err)}); {_UNREADABLE_HINT}") from err
    if total_frames < 1:
        raise VideoLoadError(f"{path}: the video has no frames; pass a file with video frames")

    avg_fps = resolve_avg_fps(reported, total_frames, duration_s, path)
    times = None
    if time_base and None not in pts:
        pts.sort()
        times = [round((p - pts[0]) * time_base, 6) for p in pts]
    indices, timestamps = choose_frames(total_frames, avg_fps, times)
    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                decoded = index + 1
                if index in wanted:
                    kept[index] = np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(frame))  # [H, W, 3]
                if index >= indices[-1]:
                    break
    except Exception as err:
        raise VideoLoadError(f"{path}: PyAV failed while decoding frame {decoded} "
                             f"({_first_line(err)}); {_UNREADABLE_HINT}") from err
    if len(kept) < len(indices):
        raise VideoLoadError(f"{path}: decoding ended after {decoded} frames, but the file holds {total_frames} "
                             f"video packets; {_UNREADABLE_HINT}")
    return _result(np.stack([kept[index] for index in indices]), indices, timestamps, avg_fps, total_frames, path)


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns (``np.rot90``'s ``k``) that show a PyAV frame upright.

    From the frame's display matrix: ``frame.rotation`` where PyAV has it, else the matrix side data
    read as FFmpeg's ``av_display_rotation_get`` does. Angles off a multiple of 90 degrees and
    mirroring are not applied.
    """
    degrees = getattr(frame, "rotation", None)
    if degrees is None:
        degrees = 0.0
        for side_data in frame.side_data:
            if getattr(side_data.type, "name", str(side_data.type)).upper().endswith("DISPLAYMATRIX"):
                matrix = np.frombuffer(bytes(side_data), dtype=np.int32)[:9] / 65536.0  # 16.16 fixed point
                scale_x, scale_y = math.hypot(matrix[0], matrix[3]), math.hypot(matrix[1], matrix[4])
                if scale_x > 0 and scale_y > 0:
                    degrees = -math.degrees(math.atan2(matrix[1] / scale_y, matrix[0] / scale_x))
    turns = round(float(degrees) / 90.0)
    return turns % 4 if abs(float(degrees) - 90.0 * turns) < 1.0 else 0


def _result(frames: np.ndarray, indices: list[int], timestamps: list[float], avg_fps: float, total_frames: int,
            path: str) -> SampledFrames:
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoLoadError(f"{path}: expected {len(indices)} RGB uint8 frames, the backend gave "
                             f"{frames.dtype} {frames.shape}; {_UNREADABLE_HINT}")
    return SampledFrames(frames=frames, timestamps=list(timestamps), indices=list(indices),
                         avg_fps=float(avg_fps), total_frames=int(total_frames))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
