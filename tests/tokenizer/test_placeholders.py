"""Images and videos: Llama 4 token layout, patch counts, markers in text and typed media parts."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from tokenizer import (
    IGNORE_INDEX,
    ImagePlaceholder,
    MediaCountMismatchError,
    ConversationFormatError,
    PlaceholderError,
    VideoPlaceholder,
    content_text,
    format_timestamp,
)


def test_single_tile_image_layout(tok):
    ids = tok.encode_image(ImagePlaceholder(tokens_per_tile=5))
    assert ids == [tok.image_start_id, tok.image_id] + [tok.patch_id] * 5 + [tok.image_end_id]
    assert ImagePlaceholder(tokens_per_tile=144).num_tokens == 147  # Llama 4's 1-tile count
    assert ImagePlaceholder(tokens_per_tile=5).num_patch_tokens == 5


def test_two_by_three_tiled_image_layout(tok):
    n = 4
    image = ImagePlaceholder(tokens_per_tile=n, grid=(2, 3))
    patches, x_sep, y_sep = [tok.patch_id] * n, tok.tile_x_separator_id, tok.tile_y_separator_id
    row = patches + [x_sep] + patches + [x_sep] + patches + [y_sep]
    expected = [tok.image_start_id] + row + row + [tok.image_id] + patches + [tok.image_end_id]
    ids = tok.encode_image(image)
    assert ids == expected
    assert ids.count(tok.patch_id) == image.num_patch_tokens == n * (2 * 3 + 1)
    assert image.num_tiles == 7


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (4, 4), (1, 16)])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_image_token_count_follows_the_llama4_formula(tok, grid, n):
    h, w = grid
    image = ImagePlaceholder(tokens_per_tile=n, grid=grid)
    ids = tok.encode_image(image)
    assert len(ids) == image.num_tokens
    if h * w > 1:
        assert len(ids) == 3 + n * (h * w + 1) + h * (w - 1) + h
        assert ids.count(tok.tile_y_separator_id) == h
        assert ids.count(tok.tile_x_separator_id) == h * (w - 1)
    else:
        assert len(ids) == n + 3


def test_video_with_three_frames(tok):
    video = VideoPlaceholder(timestamps=[0.0, 1.5, 3.0], tokens_per_frame=6)
    ids = tok.encode_video(video)
    assert ids[0] == tok.video_start_id and ids[-1] == tok.video_end_id
    assert ids.count(tok.patch_id) == video.num_patch_tokens == 18
    assert ids.count(tok.image_start_id) == ids.count(tok.image_end_id) == ids.count(tok.image_id) == 3
    frame = "<|image_start|><|image|>" + "<|patch|>" * 6 + "<|image_end|>"
    assert tok.decode(ids, skip_special_tokens=False) == (
        f"<|video_start|>0s{frame}1.5s{frame}3s{frame}<|video_end|>"
    )
    assert tok.decode(ids) == "0s1.5s3s"  # timestamps are plain text


@pytest.mark.parametrize(
    "timestamps",
    [
        np.array([0.0, 0.5, 1.25]),
        np.array([0, 0.5, 1.25], dtype=np.float32),
        [np.float32(0.0), np.float64(0.5), np.int64(1) + np.float32(0.25)],
        torch.tensor([0.0, 0.5, 1.25]),
        (t / 4 for t in (0, 2, 5)),
        [0, Fraction(1, 2), 1.25],
        list(torch.tensor([0.0, 0.5, 1.25])),
    ],
    ids=["float64-array", "float32-array", "numpy-scalars", "tensor", "generator", "fraction", "0-d-tensors"],
)
def test_video_timestamps_may_be_any_iterable_of_real_numbers(tok, timestamps):
    """Frame times straight from a video reader (arrays, tensors, numpy scalars) need no conversion."""
    video = VideoPlaceholder(timestamps=timestamps, tokens_per_frame=2)
    assert video.timestamps == (0.0, 0.5, 1.25)
    assert all(type(time) is float for time in video.timestamps)
    assert tok.decode(tok.encode_video(video)) == "0s0.5s1.25s"
    assert video == VideoPlaceholder(timestamps=[0.0, 0.5, 1.25], tokens_per_frame=2)


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (0.0, "0s"), (1.5, "1.5s"), (2.0, "2s"), (0.25, "0.25s"), (10, "10s"), (12.345, "12.35s"), (0.001, "0s")],
)
def test_timestamp_format_is_compact_seconds(seconds, text):
    assert format_timestamp(seconds) == text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ImagePlaceholder(tokens_per_tile=0), "tokens_per_tile=0"),
        (lambda: ImagePlaceholder(tokens_per_tile=4, grid=(0, 2)), "grid rows=0"),
        (lambda: ImagePlaceholder(tokens_per_tile=4, grid=(2,)), r"grid=\(2,\) must be a \(rows, cols\) pair"),
        (lambda: VideoPlaceholder(timestamps=[], tokens_per_frame=4), "at least one frame"),
        (lambda: VideoPlaceholder(timestamps=[0, -1], tokens_per_frame=4), r"timestamps\[1\]=-1"),
        (lambda: VideoPlaceholder(timestamps=[2, 1], tokens_per_frame=4), "time order"),
        (lambda: VideoPlaceholder(timestamps=[float("nan")], tokens_per_frame=4), "finite"),
        (lambda: VideoPlaceholder(timestamps=[0], tokens_per_frame=0), "tokens_per_frame=0"),
        (lambda: VideoPlaceholder(timestamps="0.5", tokens_per_frame=4), "must be a list"),
        (lambda: VideoPlaceholder(timestamps=0.5, tokens_per_frame=4), "must be a list"),
        (lambda: VideoPlaceholder(timestamps=np.float32(0.5), tokens_per_frame=4), "must be a list"),
        (lambda: VideoPlaceholder(timestamps=[0, True], tokens_per_frame=4), r"timestamps\[1\]=True"),
        (lambda: VideoPlaceholder(timestamps=["0.5"], tokens_per_frame=4), r"timestamps\[0\]='0.5'"),
        (lambda: VideoPlaceholder(timestamps=np.array([0.0, np.inf]), tokens_per_frame=4), "finite"),
        (lambda: VideoPlaceholder(timestamps=[np.float32(1), np.float32(0.5)], tokens_per_frame=4), "time order"),
        (lambda: ImagePlaceholder(tokens_per_tile=4.0), r"tokens_per_tile=4.0 must be an int"),
        (lambda: ImagePlaceholder(tokens_per_tile=True), r"tokens_per_tile=True must be an int"),
        (lambda: ImagePlaceholder(tokens_per_tile=np.bool_(True)), r"tokens_per_tile=.*True.* must be an int"),
        (lambda: ImagePlaceholder(tokens_per_tile=torch.tensor([4])), r"tokens_per_tile=tensor\(\[4\]\)"),
    ],
)
def test_invalid_placeholders_are_rejected(make, message):
    with pytest.raises(PlaceholderError, match=message):
        make()


def test_sizes_may_be_numpy_or_tensor_integers(tok):
    """Sizes computed with numpy or torch (a grid from an array's shape arithmetic) need no conversion."""
    image = ImagePlaceholder(tokens_per_tile=np.int64(4), grid=(np.int32(2), torch.tensor(3)))
    assert image == ImagePlaceholder(tokens_per_tile=4, grid=(2, 3))
    assert type(image.tokens_per_tile) is int and all(type(n) is int for n in image.grid)
    assert tok.encode_image(image) == tok.encode_image(ImagePlaceholder(tokens_per_tile=4, grid=(2, 3)))
    video = VideoPlaceholder(timestamps=[0.0], tokens_per_frame=np.int16(2))
    assert type(video.tokens_per_frame) is int and video == VideoPlaceholder(timestamps=[0.0], tokens_per_frame=2)


def _conversation(user_content, assistant="It shows shapes."):
    return [{"role": "user", "content": user_content}, {"role": "assistant", "content": assistant}]


def test_markers_are_replaced_in_order_and_expanded_to_their_patch_counts(tok):
    images = [ImagePlaceholder(tokens_per_tile=2), ImagePlaceholder(tokens_per_tile=3, grid=(2, 3))]
    videos = [VideoPlaceholder(timestamps=[0, 0.5, 1], tokens_per_frame=4)]
    encoded = tok.encode_conversation(
        _conversation("First <image> then <video> and <image>."), images=images, videos=videos
    )
    text = tok.decode(encoded.input_ids, skip_special_tokens=False)
    expected_user = (
        "First "
        + tok.decode(tok.encode_image(images[0]), skip_special_tokens=False)
        + " then "
        + tok.decode(tok.encode_video(videos[0]), skip_special_tokens=False)
        + " and "
        + tok.decode(tok.encode_image(images[1]), skip_special_tokens=False)
        + "."
    )
    assert f"<|header_start|>user<|header_end|>\n\n{expected_user}<|eot|>" in text
    assert encoded.input_ids.count(tok.patch_id) == 2 + 3 * 7 + 3 * 4
    assert "<image>" not in text and "<video>" not in text


def test_media_tokens_are_never_supervised(tok):
    encoded = tok.encode_conversation(
        [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "Here: <image> done."}],
        images=[ImagePlaceholder(tokens_per_tile=3), ImagePlaceholder(tokens_per_tile=3, grid=(1, 2))],
    )
    media = {tok.patch_id, tok.image_id, tok.image_start_id, tok.image_end_id, tok.tile_x_separator_id}
    for token_id, label in zip(encoded.input_ids, encoded.labels):
        if token_id in media:
            assert label == IGNORE_INDEX
    supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert tok.decode(supervised, skip_special_tokens=False) == "Here:  done.<|eot|>"


def test_content_as_typed_parts_encodes_like_text_with_markers(tok):
    """The chat format of Hugging Face processors and OpenAI-style APIs: a turn's content as a list of
    {"type": "image" | "video" | "text"} parts gives the very ids and labels of the same text with markers."""
    image, video = ImagePlaceholder(tokens_per_tile=2), VideoPlaceholder(timestamps=[0, 0.5], tokens_per_frame=2)
    parts = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nthen "}, {"type": "image"},
                                          {"type": "text", "text": " what moved?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "the red circle"}]}]
    text = [{"role": "user", "content": "<video>\nthen <image> what moved?"},
            {"role": "assistant", "content": "the red circle"}]
    by_parts = tok.encode_conversation(parts, images=[image], videos=[video])
    by_text = tok.encode_conversation(text, images=[image], videos=[video])
    assert (by_parts.input_ids, by_parts.labels, by_parts.media_order) == (by_text.input_ids, by_text.labels,
                                                                         by_text.media_order)
    assert by_parts.media_order == ["video", "image"]


def _render(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_a_marker_typed_in_a_text_part_stays_text(tok):
    """With typed parts, the media come from the media parts only: a <image> in a text part is literal."""
    image = ImagePlaceholder(tokens_per_tile=2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is <image> an HTML tag?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes: <image> and <video> are tags."}]}]
    encoded = tok.encode_conversation(messages, images=[image])
    text = _render(tok, encoded.input_ids)
    block = _render(tok, tok.encode_image(image))
    assert f"<|header_start|>user<|header_end|>\n\n{block}Is <image> an HTML tag?<|eot|>" in text
    assert encoded.media_order == ["image"]
    assert encoded.input_ids.count(tok.patch_id) == 2
    supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert _render(tok, supervised) == "Yes: <image> and <video> are tags.<|eot|>"


def test_text_parts_with_markers_but_no_media_parts_place_media_as_if_unmarked(tok):
    image = ImagePlaceholder(tokens_per_tile=2)
    messages = _conversation([{"type": "text", "text": "What does <video> do?"}])
    text_only = tok.encode_conversation(messages)
    assert "What does <video> do?<|eot|>" in _render(tok, text_only.input_ids)
    with_image = tok.encode_conversation(messages, images=[image])
    assert f"\n\n{_render(tok, tok.encode_image(image))}What does <video> do?<|eot|>" in _render(
        tok, with_image.input_ids
    )


def test_a_backslash_escapes_a_marker_in_str_content(tok):
    image = ImagePlaceholder(tokens_per_tile=2)
    escaped = tok.encode_conversation(_conversation("<image>Is \\<image> a tag? \\<video>"), images=[image])
    typed = tok.encode_conversation(
        _conversation([{"type": "image"}, {"type": "text", "text": "Is <image> a tag? <video>"}]), images=[image]
    )
    assert (escaped.input_ids, escaped.labels) == (typed.input_ids, typed.labels)
    block = _render(tok, tok.encode_image(image))
    assert f"\n\n{block}Is <image> a tag? <video><|eot|>" in _render(tok, escaped.input_ids)
    # Two backslashes are one backslash of text, then a marker; a backslash elsewhere is plain text.
    doubled = tok.encode_conversation(_conversation("a\\\\<image> b\\c"), images=[image])
    assert f"\n\na\\{block} b\\c<|eot|>" in _render(tok, doubled.input_ids)


def test_content_text_of_typed_parts_encodes_like_the_parts(tok):
    """The dataset loader turns typed parts into a str with content_text: a literal <image> must survive."""
    image = ImagePlaceholder(tokens_per_tile=2)
    parts = [{"type": "text", "text": "a\\"}, {"type": "image"}, {"type": "text", "text": "Is <image> a tag?\\"}]
    as_text = content_text(parts, "turn 0 content")
    assert as_text == "a\\\\<image>Is \\<image> a tag?\\"
    by_parts = tok.encode_conversation(_conversation(parts), images=[image])
    by_text = tok.encode_conversation(_conversation(as_text), images=[image])
    assert (by_text.input_ids, by_text.labels) == (by_parts.input_ids, by_parts.labels)
    assert f"\n\na\\{_render(tok, tok.encode_image(image))}Is <image> a tag?\\<|eot|>" in _render(
        tok, by_parts.input_ids
    )


_tricky_text = hs.lists(hs.sampled_from(["<image>", "<video>", "\\", "<", ">", "image", "a", " "]), max_size=8).map(
    "".join
)
_typed_part = hs.one_of(
    _tricky_text.map(lambda text: {"type": "text", "text": text}),
    hs.just({"type": "image"}),
    hs.just({"type": "video"}),
)


@settings(max_examples=200, deadline=None)
@given(parts=hs.lists(_typed_part, max_size=6))
def test_typed_parts_render_text_literally_and_media_where_the_media_parts_are(tok, parts):
    image, video = ImagePlaceholder(tokens_per_tile=1), VideoPlaceholder(timestamps=[0], tokens_per_frame=1)
    blocks = {"image": _render(tok, tok.encode_image(image)), "video": _render(tok, tok.encode_video(video))}
    images = [image] * sum(part["type"] == "image" for part in parts)
    videos = [video] * sum(part["type"] == "video" for part in parts)
    expected = "".join(part["text"] if part["type"] == "text" else blocks[part["type"]] for part in parts)
    for content in (parts, content_text(parts, "content")):
        encoded = tok.encode_conversation(_conversation(content), images=images, videos=videos)
        assert f"user<|header_end|>\n\n{expected}<|eot|>" in _render(tok, encoded.input_ids)
        assert encoded.media_order == [part["type"] for part in parts if part["type"] != "text"]


def test_without_markers_media_go_to_the_start_of_the_first_user_turn(tok):
    image, video = ImagePlaceholder(tokens_per_tile=2), VideoPlaceholder(timestamps=[0], tokens_per_frame=2)
    messages = [{"role": "system", "content": "Be brief."}] + _conversation("What is shown?")
    encoded = tok.encode_conversation(messages, images=[image], videos=[video])
    text = tok.decode(encoded.input_ids, skip_special_tokens=False)
    media = tok.decode(tok.encode_image(image) + tok.encode_video(video), skip_special_tokens=False)
    assert f"<|header_start|>user<|header_end|>\n\n{media}What is shown?<|eot|>" in text
    assert text.count("<|patch|>") == 4


@pytest.mark.parametrize(
    "content, num_images, num_videos, message",
    [
        ("<image><image> two", 1, 0, r"2 <image> marker\(s\) but 1 image\(s\) were given"),
        ("<image> one", 2, 0, r"1 <image> marker\(s\) but 2 image\(s\)"),
        ("<image> but no video marker", 1, 1, r"0 <video> marker\(s\) but 1 video\(s\)"),
        ("typed <image> with nothing passed", 0, 0, r"1 <image> marker\(s\) but 0 image\(s\)"),
        ("<video>", 0, 0, r"1 <video> marker\(s\) but 0 video\(s\) were given;"),
        ("<image> about a clip", 0, 1, r"1 <image> marker\(s\) but 0 image\(s\) were given \(<video> marks a video, "
                                       r"<image> an image: is one written for the other\?\)"),
    ],
)
def test_marker_count_mismatch_names_both_counts(tok, content, num_images, num_videos, message):
    with pytest.raises(MediaCountMismatchError, match=r"sample 'img-9'.*" + message):
        tok.encode_conversation(
            _conversation(content),
            images=[ImagePlaceholder(tokens_per_tile=1)] * num_images,
            videos=[VideoPlaceholder(timestamps=[0], tokens_per_frame=1)] * num_videos,
            sample_id="img-9",
        )


def test_unmarked_media_without_a_user_turn_is_an_error(tok):
    with pytest.raises(ConversationFormatError, match="no user turn"):
        tok.encode_conversation(
            [{"role": "assistant", "content": "hi"}], images=[ImagePlaceholder(tokens_per_tile=1)]
        )


def test_media_arguments_must_be_placeholders(tok):
    with pytest.raises(PlaceholderError, match=r"images\[0\] is a int, expected ImagePlaceholder"):
        tok.encode_conversation(_conversation("<image>"), images=[144])
    with pytest.raises(PlaceholderError, match="images must be a list of ImagePlaceholder"):
        tok.encode_conversation(_conversation("<image>"), images=ImagePlaceholder(tokens_per_tile=1))


def test_media_parts_may_name_their_files(tok):
    """Hugging Face-style parts that carry their file ({"type": "image", "image": path}, or "path"/"url"):
    `media_part_paths` gives (kind, path) in order; `content_text` places their markers as for bare parts."""
    from tokenizer import ConversationFormatError, content_text, media_part_paths

    content = [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "then"},
               {"type": "video", "path": "v.mp4"}, {"type": "image"}, {"type": "image", "url": "https://x.org/b.png"}]
    assert media_part_paths(content, "turn 0") == [("image", "img/a.png"), ("video", "v.mp4"), ("image", None),
                                                   ("image", "https://x.org/b.png")]
    bare = [{"type": "image"}, {"type": "text", "text": "then"}, {"type": "video"}, {"type": "image"},
            {"type": "image"}]
    assert content_text(content, "turn 0") == content_text(bare, "turn 0") == "<image>then<video><image><image>"
    assert media_part_paths("<image>\nWhat?", "turn 0") == []
    with pytest.raises(ConversationFormatError, match=r"turn 1 part 0: 'image' must be the path of the image file"):
        media_part_paths([{"type": "image", "image": {"bytes": b"..."}}], "turn 1")
    with pytest.raises(ConversationFormatError, match="names more than one image file"):
        media_part_paths([{"type": "image", "image": "a.png", "path": "b.png"}], "turn 1")
