"""load_image (every input kind, every PIL mode, EXIF, bomb guard, errors) and ImageProcessor."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vision.errors import ImageLoadError, ImageTooLargeError, VisionInputError
from vision.image import CLIP_MEAN, CLIP_STD, ImageProcessor, load_image, to_rgb


def _pixels(image):
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def test_path_bytes_and_file_object_give_the_same_rgb_pixels(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path)
    for source in (str(path), path, path.read_bytes(), open(path, "rb")):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (9, 6)
        assert np.array_equal(_pixels(image), array)


def test_numpy_inputs_of_every_supported_shape_and_dtype():
    gray = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    assert np.array_equal(_pixels(load_image(gray))[..., 1], gray)
    assert np.array_equal(_pixels(load_image(gray[..., None]))[..., 0], gray)
    rgb = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    assert np.array_equal(_pixels(load_image(rgb)), rgb)
    assert np.array_equal(_pixels(load_image(rgb / 255.0)), rgb)  # float in [0, 1]
    assert np.array_equal(_pixels(load_image(rgb.astype(np.int64))), rgb)  # ints in 0-255
    assert np.array_equal(_pixels(load_image(rgb.astype(np.uint16) * 257)), rgb)  # 16-bit scaled
    assert _pixels(load_image(np.array([[True, False]])))[0, :, 0].tolist() == [255, 0]


def test_rgba_array_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    pixels = _pixels(load_image(rgba))
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert pixels[0, 2].tolist() == [127, 127, 127]


def test_torch_tensors_channels_first_or_last_uint8_or_float():
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    hwc = torch.from_numpy(rgb)
    chw = hwc.permute(2, 0, 1)
    for tensor in (hwc, chw, chw.float() / 255, hwc.float() / 255, (chw.float() / 255).to(torch.bfloat16)):
        image = load_image(tensor)
        assert image.size == (6, 4)
        tolerance = 2 if tensor.dtype == torch.bfloat16 else 0
        assert np.abs(_pixels(image).astype(int) - rgb).max() <= tolerance
    # shapes that read both ways: 3 channels first, then channels-first (the torch convention)
    assert load_image(torch.zeros(3, 7, 3, dtype=torch.uint8)).size == (3, 7)
    assert load_image(torch.zeros(4, 7, 1, dtype=torch.uint8)).size == (1, 7)
    assert load_image(torch.zeros(1, 7, 4, dtype=torch.uint8)).size == (4, 7)


def test_text_mode_file_object_is_rejected_with_how_to_open_it(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    with open(path) as text_file, pytest.raises(ImageLoadError, match=r"photo\.png.*text mode.*binary mode.*'rb'"):
        load_image(text_file)


def test_float_values_a_rounding_error_outside_0_1_are_clipped():
    # e.g. after resizing or un-normalising: 1.0000001 and -1e-7 are 1 and 0, not an error
    pixels = _pixels(load_image(np.array([[[1.0000001, -1e-7, 0.5]], [[1.0009, -0.0009, 0.0]]])))
    assert pixels.tolist() == [[[255, 0, 128]], [[255, 0, 0]]]
    assert _pixels(load_image(torch.tensor([[1.0000001, -1e-7]])))[0, :, 0].tolist() == [255, 0]
    with pytest.raises(ImageLoadError, match=r"values in \[0, 1\.002\]: float images must lie in \[0, 1\]"):
        load_image(np.array([[0.0, 1.002]]))
    with pytest.raises(ImageLoadError, match=r"values in \[-0\.002, 0\]"):
        load_image(np.array([[-0.002, 0.0]]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((2, 2, 2, 3), np.uint8), "expected"),
        (np.full((2, 2, 3), 1.5), r"\[0, 1\]"),
        (np.full((2, 2, 3), -0.5, np.float32), "un-normalise"),
        (np.array([[300]]), "0-255"),
        (np.array([[0, 30000, 65535]], np.int32), "convert it to uint16"),  # astype(uint8) would wrap them
        (np.array([[70000]]), "scale it to 0-255"),
        (np.zeros((4, 5, 2), np.uint8), r"grey and alpha: pass the grey channel alone"),  # not "channels-first"
        (Image.new("RGB", (0, 5)), r"the PIL image is empty \(0x5 pixels\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((2, 2), np.nan), "NaN"),
        (torch.zeros(1, 3, 8, 8), "one image at a time"),
        (torch.zeros(8, 8, 5), "not an image"),
        (12, "int"),
        ([[0, 1]], "list"),
    ],
)
def test_unsupported_inputs_raise_image_load_error_naming_the_input(bad, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(bad)


# ---------------------------------------------------------------------------------------------
# PIL modes
# ---------------------------------------------------------------------------------------------


def test_la_and_palette_transparency_are_composited_on_white():
    la = Image.fromarray(np.array([[[0, 255], [0, 0]]], dtype=np.uint8), mode="LA")
    assert _pixels(to_rgb(la))[0].tolist() == [[0, 0, 0], [255, 255, 255]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # index 1 (green) is transparent
    assert _pixels(to_rgb(palette))[0].tolist() == [[255, 0, 0], [255, 255, 255]]


def test_palette_png_with_transparency_round_trips_through_a_file(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)
    assert _pixels(load_image(path))[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def _png_bytes(image, **save_options):
    """The bytes of ``image`` saved as a PNG with ``save_options`` (a transparency key goes in its tRNS chunk)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_options)
    return buffer.getvalue()


def test_rgb_png_with_a_transparency_key_is_composited_on_white():
    rgb = Image.new("RGB", (2, 1), (10, 20, 30))
    rgb.putpixel((1, 0), (1, 2, 3))
    encoded = _png_bytes(rgb, transparency=(10, 20, 30))
    assert Image.open(io.BytesIO(encoded)).mode == "RGB"
    assert _pixels(load_image(encoded))[0].tolist() == [[255, 255, 255], [1, 2, 3]]
    # a key that matches no pixel changes nothing
    assert _pixels(load_image(_png_bytes(rgb, transparency=(9, 9, 9))))[0].tolist() == [[10, 20, 30], [1, 2, 3]]


def test_sixteen_bit_png_with_a_transparency_key_is_composited_on_white():
    values = np.array([[1000, 25700]], dtype=np.uint16)  # 25700 = 100 * 257
    encoded = _png_bytes(Image.fromarray(values), transparency=1000)
    assert Image.open(io.BytesIO(encoded)).mode.startswith("I;16")
    assert _pixels(load_image(encoded))[0].tolist() == [[255, 255, 255], [100, 100, 100]]


def test_palette_with_alpha_in_its_palette_is_composited_on_white():
    # quantizing RGBA keeps alpha in the palette (no info["transparency"]); fully transparent red is white
    palette = Image.new("RGBA", (4, 4), (255, 0, 0, 0)).quantize(method=Image.Quantize.FASTOCTREE)
    assert palette.mode == "P" and "transparency" not in palette.info
    assert _pixels(load_image(palette)).reshape(-1, 3).tolist() == [[255, 255, 255]] * 16
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128)).quantize(method=Image.Quantize.FASTOCTREE)
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 25700, 65535]], dtype=np.uint16)  # 25700 = 100 * 257
    image16 = Image.fromarray(values)
    assert image16.mode.startswith("I;16")
    assert _pixels(to_rgb(image16))[0, :, 0].tolist() == [0, 100, 255]
    path = tmp_path / "depth.png"
    image16.save(path)  # a 16-bit grayscale PNG
    assert _pixels(load_image(path))[0, :, 0].tolist() == [0, 100, 255]
    # mode I (32-bit int) holding 16-bit values is scaled the same way
    assert _pixels(to_rgb(Image.fromarray(values.astype(np.int32))))[0, :, 0].tolist() == [0, 100, 255]
    # a big-endian 16-bit array (np.asarray of a big-endian TIFF / PGM) the same way
    assert _pixels(load_image(values.astype(">u2")))[0, :, 0].tolist() == [0, 100, 255]


def test_float_mode_uses_its_range():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _pixels(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert _pixels(to_rgb(byte_range))[0, :, 0].tolist() == [0, 100, 255]
    other = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32))
    assert _pixels(to_rgb(other))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_bilevel_gray_and_ycbcr_convert_to_the_right_colours():
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert bilevel.mode == "1"
    assert _pixels(to_rgb(bilevel))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    ycbcr = Image.new("RGB", (1, 1), (200, 40, 90)).convert("YCbCr")
    assert np.abs(np.subtract(to_rgb(ycbcr).getpixel((0, 0)), (200, 40, 90))).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste(Image.new("RGB", (20, 20), (255, 0, 0)), (0, 0))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    image = load_image(path)
    assert image.size == (20, 40)  # portrait after rotation
    assert image.getpixel((10, 5)) == (255, 0, 0)  # the left half is now on top
    assert image.getpixel((10, 35)) == (0, 0, 255)


# ---------------------------------------------------------------------------------------------
# Errors and the decompression-bomb guard
# ---------------------------------------------------------------------------------------------


def _png_claiming(width, height):
    """A PNG whose header claims ``width x height`` but carries almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(8000, 8000))  # 64 MP > 50 MP default; the data would not even decode
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "bomb.png" in message and "8000x8000" in message and "50,000,000" in message and "max_pixels" in message
    assert isinstance(caught.value, VisionInputError) and isinstance(caught.value, ValueError)

    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    with pytest.raises(ImageTooLargeError, match="400 pixels"):
        load_image(small, max_pixels=399)
    assert load_image(small, max_pixels=400).size == (20, 20)


def test_raising_the_limit_lets_the_header_pass_then_the_broken_data_is_reported(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(8000, 8000))
    with pytest.raises(ImageLoadError, match="broken") as caught:
        load_image(path, max_pixels=None)
    assert not isinstance(caught.value, ImageTooLargeError)


def test_missing_folder_broken_and_non_image_files_raise_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope.png.*does not exist \(working directory .*\): check the path"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="https:// URL, and fusion never downloads"):
        load_image("https://example.com/cat.png")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    with pytest.raises(ImageLoadError, match=r"clip.mp4.*it looks like a video: pass it as a video \(fusion.pipeline"
                                             r"\('video-qa'\) with video=.*videos=\[\[...\]\].*\"videos\" with <video>"):
        load_image(clip)
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.txt"):
        load_image(text)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)


# ---------------------------------------------------------------------------------------------
# ImageProcessor
# ---------------------------------------------------------------------------------------------


def test_single_tile_resizes_keeping_aspect_pads_with_the_mean_and_normalises():
    processor = ImageProcessor(image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    red = np.zeros((10, 20, 3), np.uint8)
    red[..., 0] = 255
    pixels, grid = processor(red)
    assert grid == (1, 1) and pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    expected_red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[0, :, :16, :], expected_red.view(3, 1, 1).expand(3, 16, 32), atol=1e-6)
    assert torch.equal(pixels[0, :, 16:, :], torch.zeros(3, 16, 32))  # padding normalises to exactly 0


def test_black_padding_option_reproduces_llama4_padding():
    processor = ImageProcessor(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_with_mean=False)
    pixels, _ = processor(np.full((10, 20, 3), 255, np.uint8))
    assert torch.equal(pixels[0, :, :16], torch.ones(3, 16, 32))
    assert torch.equal(pixels[0, :, 16:], -torch.ones(3, 16, 32))


def test_multi_tile_processor_returns_tiles_thumbnail_and_grid():
    processor = ImageProcessor(image_size=32, max_tiles=4)
    pixels, grid = processor(np.zeros((32, 64, 3), np.uint8))
    assert grid == (1, 2) and pixels.shape == (3, 3, 32, 32)
    pixels, grid = processor(np.zeros((8, 8, 3), np.uint8))
    assert grid == (1, 1) and pixels.shape == (1, 3, 32, 32)


def test_processor_settings_round_trip_through_json():
    processor = ImageProcessor(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_tiles=9,
                               pad_with_mean=False, max_pixels=1000)
    restored = ImageProcessor.from_dict(json.loads(json.dumps(processor.to_dict())))
    assert restored == processor
    assert ImageProcessor.from_dict({"image_size": 64}) == ImageProcessor(64)
    with pytest.raises(ValueError, match="unknown settings.*tile_count"):
        ImageProcessor.from_dict({"image_size": 64, "tile_count": 3})


def test_processor_applies_its_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(path)
    with pytest.raises(ImageTooLargeError):
        ImageProcessor(image_size=16, max_pixels=100)(path)


@pytest.mark.parametrize("settings", [{"image_size": 0}, {"image_size": 8, "max_tiles": 0},
                                      {"image_size": 8, "std": (1, 0, 1)}, {"image_size": 8, "mean": (0.5,)}])
def test_processor_rejects_bad_settings(settings):
    with pytest.raises(ValueError):
        ImageProcessor(**settings)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)
