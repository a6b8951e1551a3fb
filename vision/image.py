"""Images in: load anything image-like as an RGB ``PIL.Image``, then turn it into encoder pixels.

``load_image`` accepts a path, raw bytes or a binary file object, a ``PIL.Image``, a numpy
array or a torch tensor, applies the EXIF orientation, converts every PIL mode to RGB
properly (transparency composited on white, 16-bit and float images scaled, not clipped)
and guards against decompression bombs before decoding.

``ImageProcessor`` turns one image into normalised tiles ``[n_tiles, 3, S, S]`` and the tile
grid ``(rows, cols)`` (see ``vision.tiling`` for the Llama 4 tiling).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, ImageTooLargeError, url_hint
from .tiling import tile_image

# suffixes of a file that is a video, not an image (named in the error when one is passed as an image)
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageInput",
    "load_image",
    "to_rgb",
    "ImageProcessor",
]

#: Default decompression-bomb limit: 50 megapixels (e.g. 8660 x 5773). Pass ``max_pixels`` to change it.
DEFAULT_MAX_PIXELS = 50_000_000

#: The OpenAI CLIP normalisation, used by MetaCLIP and open_clip's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, os.PathLike, bytes, io.IOBase, Image.Image, np.ndarray, torch.Tensor]

_WHITE = (255, 255, 255)

# Float images may overshoot [0, 1] by this much (rounding errors of resizing or un-normalising, e.g.
# 1.0000001 or -1e-7); such values are clipped. 1e-3 is a quarter of one 0-255 step.
_FLOAT_SLACK = 1e-3


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_image(image: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``image`` as an RGB ``PIL.Image``.

    Args:
        image: one of
            - a path (``str`` / ``os.PathLike``), raw encoded ``bytes`` or a binary file object;
            - a ``PIL.Image`` (any mode);
            - a numpy array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (RGBA), ``uint8``
              (0-255), ``uint16`` (0-65535), ``bool``, or float in [0, 1]
              (overshoots of up to 1e-3, rounding errors, are clipped);
            - a torch tensor ``[C, H, W]`` or ``[H, W, C]`` (C in 1, 3, 4) or ``[H, W]``, same dtypes.
              A shape that reads both ways is resolved towards 3 channels, then channels-first:
              ``[3, H, 3]`` is ``[C, H, W]``, ``[4, W, 3]`` is ``[H, W, C]``.
        max_pixels: decompression-bomb guard for encoded images (path, bytes, file): the pixel count
            read from the header must not exceed it. ``None`` turns the guard off.

    The EXIF orientation is applied. Transparent pixels are composited on white.

    Raises:
        ImageLoadError: missing, unreadable or broken file; unsupported type, shape or values.
        ImageTooLargeError: the encoded image has more than ``max_pixels`` pixels.
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ImageLoadError(f"the PIL image is empty ({image.width}x{image.height} pixels)")
        return to_rgb(_exif_transpose(image, "the PIL image"), "the PIL image")
    if isinstance(image, (str, os.PathLike)):
        return _load_encoded(os.fspath(image), repr(os.fspath(image)), max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _load_encoded(io.BytesIO(bytes(image)), f"the {len(image)}-byte image buffer", max_pixels)
    if isinstance(image, io.IOBase) or (hasattr(image, "read") and hasattr(image, "seek")):
        name = f"the file object {getattr(image, 'name', type(image).__name__)!r}"
        if isinstance(image, io.TextIOBase):
            raise ImageLoadError(_TEXT_MODE_MESSAGE.format(name=name))
        return _load_encoded(image, name, max_pixels)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, f"the numpy array of shape {tuple(image.shape)}")
    raise ImageLoadError(
        f"cannot load an image from a {type(image).__name__}: pass a file path, encoded bytes, "
        "a PIL.Image, a numpy array [H, W, C] or a torch tensor [C, H, W]"
    )


_TEXT_MODE_MESSAGE = ("{name} is open in text mode, so it gives characters, not the image's bytes: "
                      "open the file in binary mode, open(path, 'rb'), or pass its path")


def _load_encoded(source: str | io.IOBase, name: str, max_pixels: int | None) -> Image.Image:
    """Open an encoded image, check its size from the header, then decode it."""
    if isinstance(source, str):
        if not os.path.exists(source):
            hint = url_hint(source)
            raise ImageLoadError(f"image file {name} does not exist"
                                 + (hint or f" (working directory {os.getcwd()}): check the path"))
        if os.path.isdir(source):
            raise ImageLoadError(f"image path {name} is a folder: pass the path of one image file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels guard replaces PIL's DecompressionBombWarning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)  # lazy: reads the header only
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"image {name} is larger than PIL's own safety limit ({error}); if you trust it, raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels"
        ) from error
    except UnidentifiedImageError as error:
        looks_like_video = isinstance(source, str) and source.lower().endswith(VIDEO_SUFFIXES)
        hint = ("; it looks like a video: pass it as a video (fusion.pipeline('video-qa') with video=..., "
                "model.chat(..., videos=[[...]]), a dataset record's \"videos\" with <video> in its text)") \
            if looks_like_video else ""
        raise ImageLoadError(f"image {name} is not in an image format PIL can read (or is corrupt){hint}") from error
    except OSError as error:
        raise ImageLoadError(f"cannot read image {name}: {error}") from error
    except UnicodeDecodeError as error:  # a text-mode file object that is not an io.TextIOBase
        raise ImageLoadError(_TEXT_MODE_MESSAGE.format(name=name)) from error

    with opened:
        width, height = opened.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"image {name} is {width}x{height} = {width * height:,} pixels, more than the limit of "
                f"{max_pixels:,} (a guard against decompression bombs); if you trust the file, pass a "
                f"larger max_pixels (or max_pixels=None to turn the guard off)"
            )
        try:
            opened.load()
            rgb = to_rgb(_exif_transpose(opened, name), name)
            return rgb.copy() if rgb is opened else rgb  # `opened` is closed when this block ends
        except (OSError, SyntaxError, ValueError) as error:
            if isinstance(error, ImageLoadError):
                raise
            raise ImageLoadError(f"image {name} is broken and cannot be decoded: {error}") from error


def _exif_transpose(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block is ignored rather than failing the load."""
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF data must not make an otherwise good image unreadable
        return image
    return image if transposed is None else transposed


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """Convert a ``PIL.Image`` of any mode to RGB.

    - Transparency (RGBA, LA, PA, RGBa, La, P with an RGBA palette, and any mode with a
      transparency key: P, L, RGB, 16-bit I;16, ...) is composited on white.
    - 16-bit modes (``I;16*``) are scaled by 255/65535, not clipped; ``I`` (32-bit int) the same
      when its values fit 0-65535, otherwise its min-max range is stretched to 0-255.
    - ``F`` (float): values in [0, 1] are scaled by 255, values in [0, 255] kept, anything else
      is min-max stretched.
    - Everything else (L, 1, CMYK, YCbCr, LAB, HSV, RGBX, ...) uses PIL's own conversion.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _high_depth_to_uint8(image, name)
        if "transparency" not in image.info:
            return _array_to_rgb(gray, name)
        # PIL's own conversion to RGBA clips these values; apply the key to the raw values instead
        opaque = np.asarray(image) != image.info["transparency"]
        return _array_to_rgb(np.dstack([gray, gray, gray, np.where(opaque, 255, 0).astype(np.uint8)]), name)
    if _has_transparency(image):
        if mode == "La":
            image = image.convert("LA")  # un-premultiply first
        return _composite_on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"{name} has PIL mode {mode!r}, which cannot be converted to RGB: {error}") from error


def _has_transparency(image: Image.Image) -> bool:
    """An alpha channel, an RGBA palette or a transparency key (``info["transparency"]``)."""
    if hasattr(image, "has_transparency_data"):  # Pillow >= 10.1
        return image.has_transparency_data
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_uint8(image: Image.Image, name: str) -> np.ndarray:
    """Scale a single-channel 16-bit, 32-bit int or float image to ``uint8 [H, W]``."""
    values = np.asarray(image).astype(np.float64)  # [H, W]
    if not np.isfinite(values).all():
        raise ImageLoadError(f"{name} (PIL mode {image.mode!r}) contains NaN or infinite values")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 65535.0 * 255.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif image.mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:  # no known range: stretch what is there
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _from_tensor(tensor: torch.Tensor) -> Image.Image:
    name = f"the torch tensor of shape {tuple(tensor.shape)}"
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3:
        first, last = tensor.shape[0], tensor.shape[-1]
        # A shape that reads both ways is resolved towards 3 channels, then towards channels-first
        # (the torch convention): [3, H, 3] and [4, H, 1] are [C, H, W]; [4, W, 3] is [H, W, C].
        if first == 3 or (first in (1, 4) and last != 3):
            tensor = tensor.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
        elif last not in (1, 3, 4):
            raise ImageLoadError(f"{name} is not an image: expected [C, H, W] or [H, W, C] with C in 1, 3, 4")
    elif tensor.ndim != 2:
        hint = "; pass one image at a time (index the batch)" if tensor.ndim == 4 else ""
        raise ImageLoadError(f"{name} is not an image: expected [C, H, W], [H, W, C] or [H, W]{hint}")
    if tensor.dtype.is_floating_point:
        tensor = tensor.float()
    return _array_to_rgb(tensor.numpy(), name)


def _array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
    """numpy ``[H, W]`` / ``[H, W, 1|3|4]`` -> RGB ``PIL.Image``."""
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        if array.shape[-1] == 2:
            hint = " (2 channels, grey and alpha: pass the grey channel alone, image[..., 0])"
        elif array.shape[0] in (1, 3, 4):
            hint = " (it looks channels-first: transpose it to [H, W, C])"
        else:
            hint = ""
        raise ImageLoadError(f"{name} is not an image: expected [H, W] or [H, W, C] with C in 1, 3, 4{hint}")
    if array.ndim not in (2, 3):
        raise ImageLoadError(f"{name} is not an image: expected [H, W] or [H, W, C] with C in 1, 3, 4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"{name} is empty")
    pixels = _to_uint8(array, name)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]  # [H, W, 1] -> [H, W]
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if pixels.shape[-1] == 4:
        return _composite_on_white(Image.fromarray(pixels, mode="RGBA"))
    return Image.fromarray(pixels, mode="RGB")


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order (16-bit PNG, TIFF)
        return np.rint(array.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(f"{name} contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
            raise ImageLoadError(
                f"{name} is float with values in [{low:.4g}, {high:.4g}]: float images must lie in [0, 1] "
                "(un-normalise it, divide 0-255 values by 255, or pass uint8)"
            )
        return np.rint(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            what = ("convert it to uint16 (16-bit values)" if low >= 0 and high <= 65535
                    else "scale it to 0-255 and convert it to uint8")
            raise ImageLoadError(
                f"{name} has dtype {array.dtype} with values in [{low}, {high}]: integer images must lie in "
                f"0-255 (or be uint16); {what}"
            )
        return array.astype(np.uint8)
    raise ImageLoadError(f"{name} has dtype {array.dtype}, which is not an image type: use uint8 or float in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageProcessor:
    """Turn one image into normalised encoder tiles.

    ``processor(image) -> (pixels, (rows, cols))`` with ``pixels`` a float tensor
    ``[n_tiles, 3, image_size, image_size]``.

    - ``max_tiles == 1``: the image is resized keeping its aspect ratio to fit
      ``image_size x image_size`` (up or down) and padded bottom/right; grid ``(1, 1)``.
    - ``max_tiles > 1``: Llama 4 tiling (``vision.tiling.tile_image``): ``rows x cols`` tiles
      row-major, then a global thumbnail when there is more than one tile.

    Padding: by default the padding is the normalisation mean, so padded pixels are exactly 0
    after normalisation — the "no signal" value the encoder sees least surprisingly, and the
    same for every mean/std. ``pad_with_mean=False`` pads with black as Llama 4 does. With it and
    Llama 4's mean and std (0.5, 0.5, 0.5), the tile grid matches transformers' Llama 4 image
    processor and the pixels are close but not identical: PIL resizes in uint8, transformers in
    float, so they differ by up to about 1.5/255. With other mean/std they do not match Llama 4.

    Resizing is bilinear (as Llama 4). Pixels are normalised as ``(x / 255 - mean) / std``.
    """

    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_tiles: int = 1
    pad_with_mean: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"ImageProcessor: image_size must be a positive integer, got {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageProcessor: mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageProcessor: std values must be positive, got {self.std}")
        if not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            raise ValueError(f"ImageProcessor: max_tiles must be an integer >= 1, got {self.max_tiles!r}")

    def __call__(self, image: ImageInput) -> tuple[torch.Tensor, tuple[int, int]]:
        """Load ``image`` (anything ``load_image`` accepts) and return ``(pixels, (rows, cols))``."""
        rgb = load_image(image, max_pixels=self.max_pixels)
        fill = self.mean if self.pad_with_mean else (0.0, 0.0, 0.0)
        tiles, grid = tile_image(rgb, self.image_size, self.max_tiles, fill=fill)  # [n_tiles, 3, S, S] in [0, 1]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (tiles - mean) / std, grid

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable settings (for a checkpoint's ``config.json``)."""
        settings = asdict(self)
        settings["mean"] = list(self.mean)
        settings["std"] = list(self.std)
        return settings

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "ImageProcessor":
        """Rebuild from ``to_dict()`` output. Missing keys take their defaults; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"ImageProcessor.from_dict: unknown settings {unknown}; known ones are {sorted(known)}")
        return cls(**settings)
