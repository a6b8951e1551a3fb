"""Tests for `vision.video`: frame index choice, and sampling real files with decord and PyAV.

The test videos are written here: frame i shows the number i in binary as eight large black or
white blocks, which survive lossy compression, so every returned frame can be read back to the
frame number it came from and compared with the indices the sampler says it chose.
"""
import importlib.util
import itertools
import math
import struct
import sys
import types

import av
import numpy as np
import pytest
from PIL import Image
import torch  # noqa: F401  (before decord, always)
from hypothesis import given, settings
from hypothesis import strategies as st

import vision.video as video
from vision.errors import VideoLoadError, VisionInputError
from vision.video import SampledFrames, frame_indices, frame_indices_at_times, resolve_avg_fps, sample_frames
from vision.video_io import write_video

SIZE = 64
BITS = 8  # a 2 x 4 grid of 32 x 16 blocks: frame numbers 0..255
BACKENDS = ["decord", "pyav"]


# --------------------------------------------------------------------------- test videos


def numbered_frames(count: int) -> np.ndarray:
    """[count, 64, 64, 3] uint8: frame i is white where bit b of i is set, block b of the grid."""
    frames = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    for number in range(count):
        for bit in range(BITS):
            if number >> bit & 1:
                row, col = divmod(bit, 4)
                frames[number, row * 32:(row + 1) * 32, col * 16:(col + 1) * 16] = 255
    return frames


def read_numbers(frames: np.ndarray) -> list[int]:
    """Inverse of `numbered_frames`, reading the centre of each block (edges blur in compression)."""
    numbers = []
    for frame in frames:
        number = 0
        for bit in range(BITS):
            row, col = divmod(bit, 4)
            block = frame[row * 32 + 6:(row + 1) * 32 - 6, col * 16 + 4:(col + 1) * 16 - 4]
            number |= int(block.mean() > 127) << bit
        numbers.append(number)
    return numbers


def test_the_block_code_reads_back_every_number():
    assert read_numbers(numbered_frames(256)) == list(range(256))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> (path, frame count, fps). mkv leaves PyAV's `stream.frames` at 0; 7.5 fps is not whole."""
    folder = tmp_path_factory.mktemp("videos")
    specs = {"mp4": ("clip.mp4", 60, 10.0), "mkv": ("clip.mkv", 60, 10.0),
             "7.5fps": ("slow.mp4", 50, 7.5), "7.5fps mkv": ("slow.mkv", 50, 7.5)}
    made = {}
    for name, (filename, count, fps) in specs.items():
        path = folder / filename
        write_video(path, numbered_frames(count), fps=fps, crf=10)
        made[name] = (str(path), count, fps)
    return made


@pytest.mark.parametrize("name", ["mkv", "7.5fps mkv"])
def test_mkv_test_videos_really_lack_a_frame_count(videos, name):
    # The point of the mkv videos: PyAV must count frames itself to agree with decord, and at
    # 7.5 fps the duration (6.666 s, rounded down to ms) times the rate is 49.995, not 50.
    with av.open(videos[name][0]) as container:
        assert container.streams.video[0].frames == 0


def check_sample(result, expected_indices, avg_fps):
    """The frames really are the expected frames, with timestamps index / avg_fps."""
    frames, timestamps = result
    assert isinstance(result, SampledFrames)
    assert frames.dtype == np.uint8 and frames.shape == (len(expected_indices), SIZE, SIZE, 3)
    assert result.indices == expected_indices
    assert read_numbers(frames) == expected_indices
    assert result.avg_fps == pytest.approx(avg_fps)
    assert timestamps == pytest.approx([index / avg_fps for index in expected_indices])
    assert all(isinstance(t, float) for t in timestamps)


# --------------------------------------------------------------------------- frame_indices (pure)


@pytest.mark.parametrize("kwargs, expected", [
    # uniform: 60 frames in 8 segments of 7.5 frames; midpoints 3.75, 11.25, ... -> their frames
    (dict(num_total_frames=60, avg_fps=10, num_frames=8), [3, 11, 18, 26, 33, 41, 48, 56]),
    # uniform: 40 frames in 8 segments of 5 frames -> the middle frame of each
    (dict(num_total_frames=40, avg_fps=10, num_frames=8), [2, 7, 12, 17, 22, 27, 32, 37]),
    (dict(num_total_frames=60, avg_fps=10, num_frames=1), [30]),
    # fewer frames than asked: each frame once, no duplicates
    (dict(num_total_frames=5, avg_fps=10, num_frames=8), [0, 1, 2, 3, 4]),
    (dict(num_total_frames=8, avg_fps=10, num_frames=8), [0, 1, 2, 3, 4, 5, 6, 7]),
    # uniform over [1, 3) s = frames 10..29: 4 segments of 5 -> 12, 17, 22, 27
    (dict(num_total_frames=60, avg_fps=10, num_frames=4, start=1.0, end=3.0), [12, 17, 22, 27]),
    # start=0.7 at 10 fps is frame 7 (7.000000000000001 in floating point must not become 8)
    (dict(num_total_frames=60, avg_fps=10, num_frames=2, start=0.7, end=0.9), [7, 8]),
    # fps mode: 2 fps at 10 fps = every 5th frame from the first
    (dict(num_total_frames=60, avg_fps=10, fps=2), list(range(0, 60, 5))),
    (dict(num_total_frames=61, avg_fps=10, fps=2), list(range(0, 61, 5))),
    # fps mode, whole steps at a fractional rate: 2.5 fps at 7.5 fps = every 3rd frame
    (dict(num_total_frames=50, avg_fps=7.5, fps=2.5), list(range(0, 50, 3))),
    # fps mode, fractional steps: 1 fps at 7.5 fps -> floor(m * 7.5)
    (dict(num_total_frames=50, avg_fps=7.5, fps=1), [0, 7, 15, 22, 30, 37, 45]),
    (dict(num_total_frames=100, avg_fps=30000 / 1001, fps=1), [0, 29, 59, 89]),
    # fps above the video's rate: every frame once
    (dict(num_total_frames=10, avg_fps=5, fps=20), list(range(10))),
    # fps mode over the cap: 30 samples [0, 2, ..., 58]; 8 of them at positions 1, 5, 9, 13, 16, 20, 24, 28
    (dict(num_total_frames=60, avg_fps=10, fps=5, max_frames=8), [2, 10, 18, 26, 32, 40, 48, 56]),
    # every frame sampled, then capped: the same as uniform sampling of 8
    (dict(num_total_frames=60, avg_fps=10, fps=10, max_frames=8), [3, 11, 18, 26, 33, 41, 48, 56]),
    # fps mode over [1, 3) s starts at the range's first frame
    (dict(num_total_frames=60, avg_fps=10, fps=2, start=1.0, end=3.0), [10, 15, 20, 25]),
    (dict(num_total_frames=60, avg_fps=10, fps=2, start=0.95, end=3.0), [10, 15, 20, 25]),
    # num_frames is ignored in fps mode, max_frames in uniform mode
    (dict(num_total_frames=60, avg_fps=10, fps=1, num_frames=2), [0, 10, 20, 30, 40, 50]),
    (dict(num_total_frames=60, avg_fps=10, num_frames=4, max_frames=2), [7, 22, 37, 52]),
    # end up to one frame period past the video is accepted (rounded container durations)
    (dict(num_total_frames=60, avg_fps=10, num_frames=2, start=5.0, end=6.1), [52, 57]),
])
def test_frame_indices_worked_examples(kwargs, expected):
    assert frame_indices(**kwargs) == expected


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 500), avg_fps=st.floats(1, 120), num_frames=st.integers(1, 64),
       fps=st.one_of(st.none(), st.floats(0.05, 200)), max_frames=st.integers(1, 64),
       start_fraction=st.floats(0, 0.9), length_fraction=st.floats(0.05, 1))
def test_frame_indices_are_sorted_unique_in_range_and_counted(total, avg_fps, num_frames, fps, max_frames,
                                                               start_fraction, length_fraction):
    duration = total / avg_fps
    start = start_fraction * duration
    end = min(duration, start + length_fraction * duration)
    try:
        indices = frame_indices(total, avg_fps, num_frames=num_frames, fps=fps, max_frames=max_frames,
                                start=start, end=end)
    except VideoLoadError as err:  # only a range narrower than a frame may fail
        assert "no frame has a timestamp" in str(err)
        assert end - start < 1 / avg_fps
        return
    assert indices == sorted(set(indices))
    frames_in_range = [i for i in range(total) if start * avg_fps - 1e-6 <= i < end * avg_fps - 1e-6]
    assert set(indices) <= set(frames_in_range)
    if fps is None:
        assert len(indices) == min(num_frames, len(frames_in_range))
    else:
        assert indices[0] == frames_in_range[0] or len(indices) == max_frames
        assert len(indices) <= max_frames


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=0), "num_frames must be an integer >= 1"),
    (dict(num_frames=2.5), "num_frames must be an integer >= 1"),
    (dict(fps=0), "fps must be a positive number"),
    (dict(fps=-1.0), "fps must be a positive number"),
    (dict(fps=float("nan")), "fps must be a positive number"),
    (dict(fps=1, max_frames=0), "max_frames must be an integer >= 1"),
    (dict(start=3.0, end=2.0), "must be before end"),
    (dict(start=2.0, end=2.0), "must be before end"),
    (dict(start=-1.0), "start must be >= 0"),
    (dict(end=float("inf")), "end must be a number of seconds"),
    (dict(start=6.0), "at or after the end of the video"),
    (dict(start=10.0, end=12.0), "at or after the end of the video"),
    (dict(end=7.0), "past the end of the video"),
    (dict(start=1.01, end=1.05), "no frame has a timestamp"),
    (dict(num_total_frames=0), "the video has 0 frames"),
    (dict(avg_fps=0.0), "avg_fps must be a positive number"),
])
def test_frame_indices_rejects_bad_arguments(kwargs, message):
    arguments = dict(num_total_frames=60, avg_fps=10.0) | kwargs
    with pytest.raises(VideoLoadError, match=message):
        frame_indices(**arguments)


# --------------------------------------------------------------------------- variable frame rate (pure)

# Frames shown at 0, 0.1, 0.2, 0.3 s, then (the camera paused) at 2.0, 2.1, 2.2, 2.3 s: frame 3 stays on
# screen from 0.3 to 2.0 s, and the video ends at 2.4 s (one typical gap after its last frame).
PAUSED = [0.0, 0.1, 0.2, 0.3, 2.0, 2.1, 2.2, 2.3]


@pytest.mark.parametrize("kwargs, expected", [
    # uniform: 4 segments of 0.6 s, midpoints 0.3, 0.9, 1.5, 2.1 s -> frames 3, 3, 3, 5: frame 3, held, is taken
    # once and the frames nearest the other midpoints fill their places (2 before it, 4 after it)
    (dict(num_frames=4), [2, 3, 4, 5]),
    # an end inside the pause: the span ends a frame period after frame 3, not 1.7 s later where frame 4 starts
    (dict(num_frames=3, end=1.0), [1, 2, 3]),
    (dict(num_frames=2, end=1.0), [2, 3]),
    # no more frames than asked: each once
    (dict(num_frames=8), list(range(8))),
    # fps mode: what is on screen at 0, 0.2, 0.4, ..., 2.2 s
    (dict(fps=5), [0, 2, 3, 4, 6]),
    (dict(fps=5, max_frames=2), [2, 4]),
    # a start inside the pause: the range is frames 4-7, its span 2.0-2.4 s, midpoints 2.1 and 2.3 s
    (dict(num_frames=2, start=1.0), [5, 7]),
    (dict(fps=2, start=0.15, end=2.25), [2, 3, 6]),
])
def test_variable_rate_frames_are_chosen_by_when_they_are_shown(kwargs, expected):
    assert frame_indices_at_times(PAUSED, **kwargs) == expected


@settings(max_examples=300, deadline=None)
@given(total=st.integers(2, 300), avg_fps=st.sampled_from([1, 7.5, 10, 24, 25, 30000 / 1001, 30, 60]),
       num_frames=st.integers(1, 40), fps=st.one_of(st.none(), st.floats(0.05, 100)), max_frames=st.integers(1, 40),
       start_fraction=st.one_of(st.none(), st.floats(0, 1)), length_fraction=st.one_of(st.none(), st.floats(0, 1)))
def test_on_a_constant_rate_times_choose_what_frame_indices_chooses(total, avg_fps, num_frames, fps, max_frames,
                                                                   start_fraction, length_fraction):
    duration = total / avg_fps
    start = None if start_fraction is None else start_fraction * duration
    end = None if length_fraction is None else min(duration, (start or 0) + length_fraction * duration)
    kwargs = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
    outcomes = []
    for choose in (lambda: frame_indices(total, avg_fps, **kwargs),
                   lambda: frame_indices_at_times([i / avg_fps for i in range(total)], **kwargs)):
        try:
            outcomes.append(choose())
        except VideoLoadError:  # a range outside the video or holding no frame (the messages may differ)
            outcomes.append("error")
    assert outcomes[0] == outcomes[1]


@settings(max_examples=300, deadline=None)
@given(gaps=st.lists(st.sampled_from([0.0, 0.033, 0.033, 0.04, 0.5, 3.0, 0.0123]), max_size=80),
       num_frames=st.integers(1, 40), start_after=st.one_of(st.none(), st.integers(1, 80)))
def test_uniform_mode_gives_as_many_frames_as_asked_however_long_frames_are_held(gaps, num_frames, start_after):
    """Frames held on screen (a paused screen recording, dropped frames) never cost frames in uniform mode: the
    range's frames, as many as asked (each once if it has no more), in order, each frame shown at a segment's
    midpoint among them. (A start half-way between two frames, so that which frames are in range is plain.)"""
    times = np.concatenate(([0.0], np.cumsum(gaps))).round(6).tolist()
    start = None
    if start_after is not None and start_after < len(times) and times[start_after] > times[start_after - 1]:
        start = (times[start_after - 1] + times[start_after]) / 2
    chosen = frame_indices_at_times(times, num_frames=num_frames, start=start)
    in_range = [i for i, t in enumerate(times) if start is None or t > start]
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(in_range)
    assert len(chosen) == min(num_frames, len(in_range))
    if len(in_range) > num_frames:  # the frames the midpoint rule names are all there
        period = float(np.median(gaps)) if gaps and np.median(gaps) > 0 else 1.0
        first, slack = in_range[0], 1e-6 * period  # a millionth of a frame, as frame_indices
        t0, t1 = times[first], times[-1] + period
        midpoints = [t0 + (2 * j + 1) * (t1 - t0) / (2 * num_frames) for j in range(num_frames)]
        shown = {max(first, int(np.searchsorted(times, t + slack, side="right")) - 1) for t in midpoints}
        assert shown <= set(chosen)


@pytest.mark.parametrize("times, message", [
    ([], "the video has 0 frames"),
    ([0.0, 0.2, 0.1], "not in order"),
])
def test_variable_rate_times_that_cannot_be_used_are_named(times, message):
    with pytest.raises(VideoLoadError, match=message):
        frame_indices_at_times(times)


def test_resolve_avg_fps_trusts_a_plausible_rate_and_falls_back_to_frames_over_duration():
    assert resolve_avg_fps(29.97, 100, 50.0) == 29.97  # plausible: kept, even if the duration disagrees
    for broken in (0.0, float("nan"), float("inf"), -25.0, 90000.0, None):
        assert resolve_avg_fps(broken, 60, 6.0) == pytest.approx(10.0)


@pytest.mark.parametrize("duration", [None, 0.0, float("nan"), 1e-9])
def test_resolve_avg_fps_raises_when_no_rate_can_be_trusted(duration):
    with pytest.raises(VideoLoadError, match=r"odd\.mp4: cannot tell the frame rate.*ffmpeg"):
        resolve_avg_fps(0.0, 60, duration, "odd.mp4")


# --------------------------------------------------------------------------- sample_frames on real files


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mp4", "mkv"])
def test_uniform_mode_returns_middle_frames(videos, name, backend):
    path, _, fps = videos[name]
    result = sample_frames(path, num_frames=8, backend=backend)
    check_sample(result, [3, 11, 18, 26, 33, 41, 48, 56], fps)
    assert result.total_frames == 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_mode_with_more_frames_asked_than_the_video_has(videos, backend):
    path, count, fps = videos["mp4"]
    check_sample(sample_frames(path, num_frames=100, backend=backend), list(range(count)), fps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["7.5fps", "7.5fps mkv"])
def test_fps_mode_timestamps_are_seconds_not_sample_numbers(videos, name, backend):
    path, _, fps = videos[name]
    result = sample_frames(path, fps=2.5, backend=backend)
    check_sample(result, list(range(0, 50, 3)), 7.5)
    # frame 3 of a 7.5 fps video is shown at 0.4 s (the index / step bug would say 1.0)
    assert result.timestamps[:3] == pytest.approx([0.0, 0.4, 0.8])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mp4", "mkv"])
def test_fps_mode_is_capped_by_max_frames(videos, name, backend):
    path, _, fps = videos[name]
    uncapped = sample_frames(path, fps=5, max_frames=32, backend=backend)
    check_sample(uncapped, list(range(0, 60, 2)), fps)
    capped = sample_frames(path, fps=5, max_frames=8, backend=backend)
    check_sample(capped, [2, 10, 18, 26, 32, 40, 48, 56], fps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_and_end_trim_the_range_in_both_modes(videos, backend):
    path, _, fps = videos["mp4"]
    uniform = sample_frames(path, num_frames=4, start=1.0, end=3.0, backend=backend)
    check_sample(uniform, [12, 17, 22, 27], fps)
    by_rate = sample_frames(path, fps=2, start=1.0, end=3.0, backend=backend)
    check_sample(by_rate, [10, 15, 20, 25], fps)
    for timestamp in uniform.timestamps + by_rate.timestamps:
        assert 1.0 <= timestamp < 3.0
    to_the_end = sample_frames(path, num_frames=2, start=5.0, backend=backend)
    check_sample(to_the_end, [52, 57], fps)


@pytest.mark.parametrize("name", ["mp4", "mkv", "7.5fps", "7.5fps mkv"])
def test_backends_agree_on_count_rate_indices_and_pixels(videos, name):
    path, count, fps = videos[name]
    by_decord = sample_frames(path, fps=3, max_frames=10, backend="decord")
    by_pyav = sample_frames(path, fps=3, max_frames=10, backend="pyav")
    assert by_decord.total_frames == by_pyav.total_frames == count
    assert by_decord.avg_fps == pytest.approx(by_pyav.avg_fps) and by_decord.avg_fps == pytest.approx(fps)
    assert by_decord.indices == by_pyav.indices
    assert by_decord.timestamps == pytest.approx(by_pyav.timestamps)
    difference = np.abs(by_decord.frames.astype(int) - by_pyav.frames.astype(int))
    assert difference.mean() < 3  # same frames; only colour conversion may differ


def write_paused_video(path, times_s, *, options=None):
    """An mp4 whose frame i (numbered as in `numbered_frames`) is shown at times_s[i] seconds (B-frames on,
    so its packets come out of presentation order, unless `options` say otherwise). Frames at negative times
    are in the file but hidden by its edit list (as a cut without re-encoding leaves them)."""
    from fractions import Fraction
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = options or {"crf": "10"}
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for frame_array, t in zip(numbered_frames(len(times_s)), times_s):
            frame = av.VideoFrame.from_ndarray(frame_array, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_variable_rate_file_is_sampled_by_when_its_frames_are_shown(tmp_path, backend):
    # 24 frames: 0-11 at 10 fps, a 3-second pause on frame 11, then 12-23 at 10 fps again. Its average rate
    # (24 frames over 5.3 s, 4.5 fps) would put frame 12 at 2.65 s; it is shown at 4.1 s.
    times = [i / 10 for i in range(12)] + [4.1 + i / 10 for i in range(12)]
    path = tmp_path / "paused.mp4"
    write_paused_video(path, times)
    uniform = sample_frames(path, num_frames=6, backend=backend)
    expected = frame_indices_at_times(times, num_frames=6)
    # midpoints 0.44, 1.33, 2.21, 3.09, 3.98, 4.86 s: frame 11 is shown through the pause (1.1-4.1 s) at three of
    # them; taken once, the frames nearest the other two (10 before it, 12 and 13 after it) fill their places
    assert expected == [4, 10, 11, 12, 13, 19]
    assert uniform.indices == read_numbers(uniform.frames) == expected
    assert uniform.timestamps == pytest.approx([times[i] for i in expected], abs=1e-3)
    by_rate = sample_frames(path, fps=1, backend=backend)
    assert by_rate.indices == read_numbers(by_rate.frames) == [0, 10, 11, 21]  # on screen at 0, 1, 2, ..., 5 s
    assert by_rate.timestamps == pytest.approx([0.0, 1.0, 1.1, 5.0], abs=1e-3)
    assert by_rate.total_frames == 24


@pytest.mark.parametrize("backend", [None, "pyav"])
def test_frames_hidden_by_an_edit_list_are_not_counted_or_returned(tmp_path, backend):
    """A cut without re-encoding (`ffmpeg -ss T -c copy`) keeps the frames before the cut that later ones are
    decoded from, hidden by the file's edit list: a player shows 35 of these 40 frames, numbered 5-39. decord
    counts the hidden ones but its frame 0 is the first shown, so its frames would not be the ones chosen: the
    default backend reads such a file with PyAV, and `backend="decord"` says why it cannot."""
    times = [(k - 5) / 10 for k in range(40)]
    path = tmp_path / "cut.mp4"
    write_paused_video(path, times, options={"crf": "10", "bf": "0", "g": "100"})
    sampled = sample_frames(path, num_frames=4, backend=backend)
    assert sampled.total_frames == 35
    assert sampled.indices == [4, 13, 21, 30]
    assert read_numbers(sampled.frames) == [5 + i for i in sampled.indices]
    assert sampled.timestamps == pytest.approx([0.4, 1.3, 2.1, 3.0], abs=1e-3)
    if importlib.util.find_spec("decord") is not None:
        with pytest.raises(VideoLoadError, match="edit list hides its first 5 frames"):
            sample_frames(path, num_frames=4, backend="decord")


def test_backends_agree_on_a_variable_rate_file(tmp_path):
    times = [0.0, 0.04, 0.08, 1.0, 1.04, 1.5, 1.54, 1.58, 3.0]
    path = tmp_path / "paused.mp4"
    write_paused_video(path, times)
    by_decord, by_pyav = (sample_frames(path, num_frames=5, backend=b) for b in BACKENDS)
    assert by_decord.indices == by_pyav.indices == read_numbers(by_pyav.frames)
    assert by_decord.timestamps == by_pyav.timestamps == pytest.approx([times[i] for i in by_pyav.indices], abs=1e-3)


def test_result_unpacks_into_frames_and_timestamps(videos):
    result = sample_frames(videos["mp4"][0], num_frames=3)
    parts = list(result)
    assert len(parts) == 2
    assert parts[0] is result.frames and parts[1] is result.timestamps


def with_display_rotation(source, target, degrees):
    """Copy the mp4 `source` to `target` with its video track's display matrix (in the tkhd box) saying
    "turn me `degrees` clockwise to show", as phones record portrait video (ffprobe: rotation of -degrees)."""
    data = bytearray(open(source, "rb").read())
    box = data.find(b"tkhd")
    assert box > 0 and data[box + 4] == 0  # version 0: 32-bit times, so the matrix is 40 bytes in
    turn = math.radians(degrees)
    cos, sin = round(math.cos(turn)), round(math.sin(turn))
    matrix = [cos << 16, sin << 16, 0, -sin << 16, cos << 16, 0, 0, 0, 1 << 30]  # 16.16 fixed point, w 2.30
    data[box + 44:box + 80] = struct.pack(">9i", *matrix)
    open(target, "wb").write(data)


def corner_frames(count):
    """[count, 32, 64, 3]: landscape, white top-left corner and red bottom-right corner, black elsewhere."""
    frames = np.zeros((count, 32, 64, 3), np.uint8)
    frames[:, :12, :12] = 255
    frames[:, 20:, 52:, 0] = 255
    return frames


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_rotated_video_comes_out_upright_and_the_same_from_both_backends(tmp_path, degrees):
    stored = corner_frames(3)
    write_video(tmp_path / "stored.mp4", stored, fps=5, crf=5)
    path = str(tmp_path / f"phone{degrees}.mp4")
    with_display_rotation(tmp_path / "stored.mp4", path, degrees)
    upright = np.rot90(stored[0], k=-degrees // 90)  # turned clockwise, as a player shows it
    by_pyav = sample_frames(path, num_frames=2, backend="pyav")
    assert by_pyav.frames.shape == (2,) + upright.shape
    assert np.abs(by_pyav.frames.astype(int) - upright).mean() < 3
    if importlib.util.find_spec("decord") is None:
        pytest.skip("decord is not installed: only PyAV was checked")
    by_decord = sample_frames(path, num_frames=2, backend="decord")
    assert by_decord.frames.shape == by_pyav.frames.shape
    assert np.abs(by_decord.frames.astype(int) - by_pyav.frames.astype(int)).mean() < 3


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_rotation_is_read_from_the_display_matrix_where_pyav_frames_have_no_rotation(tmp_path, degrees):
    # Older PyAV has no `frame.rotation`; the display matrix side data says the same.
    write_video(tmp_path / "stored.mp4", corner_frames(1), fps=5)
    path = str(tmp_path / "phone.mp4")
    with_display_rotation(tmp_path / "stored.mp4", path, degrees)
    with av.open(path) as container:
        frame = next(container.decode(video=0))
        without_rotation = types.SimpleNamespace(side_data=frame.side_data)
        assert video._quarter_turns(without_rotation) == video._quarter_turns(frame) == (-degrees // 90) % 4


# --------------------------------------------------------------------------- backend choice


@pytest.fixture
def backend_calls(monkeypatch):
    """Records which backend reader `sample_frames` calls (the readers still run)."""
    calls = []
    for name in ("_sample_with_decord", "_sample_with_pyav"):
        real = getattr(video, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(video, name, spy)
    return calls


def test_decord_is_the_default_backend(videos, backend_calls):
    check_sample(sample_frames(videos["mp4"][0], num_frames=4), [7, 22, 37, 52], 10.0)
    assert backend_calls == ["_sample_with_decord"]


def test_falls_back_to_pyav_when_decord_is_missing(videos, backend_calls, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    with pytest.raises(ImportError):
        import decord  # noqa: F401
    check_sample(sample_frames(videos["mp4"][0], num_frames=4), [7, 22, 37, 52], 10.0)
    check_sample(sample_frames(videos["mkv"][0], fps=5, max_frames=8), [2, 10, 18, 26, 32, 40, 48, 56], 10.0)
    assert backend_calls == ["_sample_with_pyav", "_sample_with_pyav"]


def test_default_backend_reads_a_valid_file_that_decord_cannot_decode(tmp_path):
    # decord's get_batch fails on some widths (48 here: "Check failed: from_size == to_size"); PyAV reads it.
    frames = np.zeros((3, 64, 48, 3), np.uint8)
    frames[:, :, :24] = 255  # left half white
    path = tmp_path / "narrow.mp4"
    write_video(path, frames, fps=5)
    result = sample_frames(path, num_frames=2)
    assert result.frames.shape == (2, 64, 48, 3) and result.indices == [0, 2]
    assert np.abs(result.frames.astype(int) - frames[[0, 2]]).mean() < 3


def decord_cannot_decode(monkeypatch):
    import decord

    def fail(self, indices):
        raise RuntimeError("Check failed: from_size == to_size (12288 vs. 9216)")

    monkeypatch.setattr(decord.VideoReader, "get_batch", fail)


def test_when_decord_fails_the_default_backend_retries_with_pyav(videos, backend_calls, monkeypatch):
    decord_cannot_decode(monkeypatch)
    check_sample(sample_frames(videos["mp4"][0], num_frames=4), [7, 22, 37, 52], 10.0)
    assert backend_calls == ["_sample_with_decord", "_sample_with_pyav"]


def test_forced_decord_failing_says_it_may_be_decord_and_to_try_pyav(videos, backend_calls, monkeypatch):
    decord_cannot_decode(monkeypatch)
    with pytest.raises(VideoLoadError, match=r"clip\.mp4: decord failed to decode 4 frames.*from_size == to_size.*"
                                             r"limitation of decord.*try backend='pyav'.*corrupt, truncated"):
        sample_frames(videos["mp4"][0], num_frames=4, backend="decord")
    assert backend_calls == ["_sample_with_decord"]


def test_a_file_neither_backend_reads_names_both_failures(bad_files, backend_calls):
    path = bad_files["text"]
    with pytest.raises(VideoLoadError, match=r"PyAV cannot open it.*ffprobe.*decord, tried first, failed too: "
                                             r"decord cannot open it") as caught:
        sample_frames(path)
    assert str(caught.value).startswith(path + ":")
    assert backend_calls == ["_sample_with_decord", "_sample_with_pyav"]


def test_a_range_outside_the_video_is_not_retried_with_pyav(videos, backend_calls):
    with pytest.raises(VideoLoadError, match=r"clip\.mp4: start=6\.5 s is at or after the end") as caught:
        sample_frames(videos["mp4"][0], start=6.5)
    assert "tried first" not in str(caught.value)
    assert backend_calls == ["_sample_with_decord"]


def test_forcing_decord_when_it_is_missing_says_how_to_fix_it(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(ImportError, match=r"backend='decord'.*clip\.mp4.*pip install decord.*backend='pyav'"):
        sample_frames(videos["mp4"][0], backend="decord")


def test_unknown_backend_is_rejected(videos):
    with pytest.raises(VideoLoadError, match=r"clip\.mp4: unknown video backend 'opencv'"):
        sample_frames(videos["mp4"][0], backend="opencv")


@pytest.mark.parametrize("reported", [0.0, float("nan"), 90000.0])
def test_broken_reported_rate_falls_back_to_frames_over_duration(videos, monkeypatch, reported):
    import decord

    monkeypatch.setattr(decord.VideoReader, "get_avg_fps", lambda self: reported)
    path, _, fps = videos["mp4"]
    result = sample_frames(path, fps=2, backend="decord")
    assert result.avg_fps == pytest.approx(fps, rel=1e-3)  # 60 frames over the last frame's end time, 6 s
    assert result.timestamps == pytest.approx([index / fps for index in range(0, 60, 5)], rel=1e-3)


# --------------------------------------------------------------------------- errors


def faststart_copy(source_path, target_path):
    """Remux to an mp4 with its index (moov) first; return (its bytes, [(offset, size)] of each packet)."""
    with av.open(source_path) as source, av.open(str(target_path), "w", options={"movflags": "faststart"}) as out:
        in_stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in source.demux(in_stream):
            if packet.dts is not None:
                packet.stream = out_stream
                out.mux(packet)
    whole = target_path.read_bytes()
    assert whole[4:8] == b"ftyp" and b"moov" in whole[:2048]  # really faststart
    with av.open(str(target_path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size > 0]
    return whole, packets


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, videos):
    """name -> path of a file that cannot be sampled."""
    folder = tmp_path_factory.mktemp("bad")
    files = {}

    files["text"] = folder / "notes.mp4"
    files["text"].write_text("these are notes, not a video\n" * 20)

    files["zero bytes"] = folder / "zero.mp4"
    files["zero bytes"].write_bytes(b"")

    # mp4 index (moov) at the end, cut off: nothing can be opened
    whole = open(videos["mp4"][0], "rb").read()
    files["truncated"] = folder / "truncated.mp4"
    files["truncated"].write_bytes(whole[: len(whole) // 2])

    # index at the front (faststart), cut inside a packet: the count of packets fails
    whole, packets = faststart_copy(videos["mp4"][0], folder / "faststart.mp4")
    files["truncated data"] = folder / "truncated_data.mp4"
    files["truncated data"].write_bytes(whole[: packets[30][0] + packets[30][1] // 2])

    # packet 30 overwritten with zeros: the decoder fails there
    position, size = packets[30]
    files["corrupt packet"] = folder / "corrupt_packet.mp4"
    files["corrupt packet"].write_bytes(whole[:position] + bytes(size) + whole[position + size:])

    # a video stream with no frames at all
    files["no frames"] = folder / "no_frames.mp4"
    with av.open(str(files["no frames"]), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return {name: str(path) for name, path in files.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, message", [
    ("text", "cannot open it"),
    ("zero bytes", "cannot open it"),
    ("truncated", "cannot open it"),
    ("no frames", "has no video stream"),
])
def test_unreadable_files_raise_video_load_error(bad_files, name, message, backend):
    path = bad_files[name]
    with pytest.raises(VideoLoadError, match=message) as caught:
        sample_frames(path, backend=backend)
    assert str(caught.value).startswith(path + ":")
    assert "ffprobe" in str(caught.value) or "pass a file with video frames" in str(caught.value)
    assert isinstance(caught.value, VisionInputError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["truncated data", "corrupt packet"])
def test_damaged_data_raises_video_load_error(bad_files, name, backend):
    path = bad_files[name]
    with pytest.raises(VideoLoadError, match=r"(decord|PyAV|damaged).*corrupt, truncated") as caught:
        sample_frames(path, num_frames=8, backend=backend)
    assert str(caught.value).startswith(path + ":")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_cut_between_packets_reads_as_the_shorter_video_it_is(tmp_path, videos, backend):
    # The header still says 60 frames; both backends count the 30 packets that are left.
    whole, packets = faststart_copy(videos["mp4"][0], tmp_path / "faststart.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: packets[30][0]])
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == 60
    result = sample_frames(cut, num_frames=8, backend=backend)
    assert result.total_frames == 30
    check_sample(result, [1, 5, 9, 13, 16, 20, 24, 28], 10.0)


class AlteredContainer:
    """A PyAV container whose `demux` and `decode` outputs pass through `alter(kind, iterator)`."""

    def __init__(self, container, alter):
        self._container, self._alter = container, alter

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._container.close()

    def __getattr__(self, name):
        return getattr(self._container, name)

    def demux(self, *streams):
        return self._alter("demux", self._container.demux(*streams))

    def decode(self, *streams):
        return self._alter("decode", self._container.decode(*streams))


def alter_pyav(monkeypatch, alter):
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: AlteredContainer(real_open(*args, **kwargs), alter))


def test_pyav_decodes_only_up_to_the_last_wanted_frame(videos, monkeypatch):
    decoded = []

    def count_decoded(kind, items):
        for item in items:
            if kind == "decode":
                decoded.append(item)
            yield item

    alter_pyav(monkeypatch, count_decoded)
    check_sample(sample_frames(videos["mp4"][0], num_frames=2, end=1.0, backend="pyav"), [2, 7], 10.0)
    assert len(decoded) == 8  # frames 0..7 of 60, then it stops


def test_pyav_decoder_stopping_early_is_an_error(videos, monkeypatch):
    # A decoder that silently drops frames (here: stops after 10) must not give short results.
    alter_pyav(monkeypatch, lambda kind, items: itertools.islice(items, 10) if kind == "decode" else items)
    check_sample(sample_frames(videos["mp4"][0], num_frames=2, end=1.0, backend="pyav"), [2, 7], 10.0)
    with pytest.raises(VideoLoadError, match=r"clip\.mp4: decoding ended after 10 frames, but the file holds 60"):
        sample_frames(videos["mp4"][0], num_frames=8, backend="pyav")


def test_pyav_video_stream_without_packets_is_an_error(videos, monkeypatch):
    alter_pyav(monkeypatch, lambda kind, items: iter(()) if kind == "demux" else items)
    with pytest.raises(VideoLoadError, match=r"clip\.mp4: the video has no frames"):
        sample_frames(videos["mp4"][0], backend="pyav")


def test_a_video_with_no_frames_is_an_error(videos, monkeypatch):
    # No encoder here writes a video stream that decord opens with 0 frames; patch its count.
    import decord

    monkeypatch.setattr(decord.VideoReader, "__len__", lambda self: 0)
    with pytest.raises(VideoLoadError, match=r"clip\.mp4: the video has no frames"):
        sample_frames(videos["mp4"][0], backend="decord")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file_and_folder_raise_video_load_error(tmp_path, backend):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(VideoLoadError, match=r"nowhere\.mp4: no such file .*check the path"):
        sample_frames(missing, backend=backend)
    with pytest.raises(VideoLoadError, match="clip.mp4: no such file; it is a http:// URL"):
        sample_frames("http://example.com/clip.mp4", backend=backend)
    with pytest.raises(VideoLoadError, match="not a file"):
        sample_frames(tmp_path, backend=backend)
    with pytest.raises(VideoLoadError, match="the video path is an empty string"):
        sample_frames("", backend=backend)
    still = tmp_path / "scene.PNG"
    Image.new("RGB", (8, 8)).save(still, format="PNG")
    with pytest.raises(VideoLoadError, match=r"scene.PNG: an image file, not a video; pass it as an image"):
        sample_frames(still, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=0), "num_frames must be an integer >= 1"),
    (dict(fps=0), "fps must be a positive number"),
    (dict(fps=-2.0), "fps must be a positive number"),
    (dict(start=4.0, end=2.0), "must be before end"),
    (dict(start=6.5), "at or after the end of the video"),
    (dict(start=1.0, end=60.0), r"past the end of the video \(6\.000 s.*pass end=None"),
])
def test_bad_arguments_raise_video_load_error_naming_the_file(videos, kwargs, message, backend):
    path = videos["mp4"][0]
    with pytest.raises(VideoLoadError, match=message) as caught:
        sample_frames(path, backend=backend, **kwargs)
    assert str(caught.value).startswith(path + ":")


def test_bad_arguments_are_rejected_before_the_file_is_opened(tmp_path):
    # the argument error wins over the missing file: nothing is read to find it
    with pytest.raises(VideoLoadError, match="num_frames must be"):
        sample_frames(tmp_path / "nowhere.mp4", num_frames=0)

