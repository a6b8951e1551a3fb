"""Exceptions raised by the ``vision`` package.

Every message names the offending input and says what to do about it.
``VisionInputError`` subclasses ``ValueError`` so callers that already catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "VisionInputError",
    "ImageLoadError",
    "ImageTooLargeError",
    "VideoLoadError",
    "WeightsError",
    "is_url",
    "url_hint",
]


class VisionInputError(ValueError):
    """Base class of all errors about a vision input (image, video, array)."""


class ImageLoadError(VisionInputError):
    """An image could not be read: missing, broken, or of an unsupported type."""


class ImageTooLargeError(VisionInputError):
    """The decompression-bomb guard tripped: the image has too many pixels."""


class VideoLoadError(VisionInputError):
    """A video could not be read, has no frames, or was sampled with bad arguments."""


class WeightsError(ValueError):
    """A vision weight file cannot be used (missing, wrong format, wrong activation,
    or not matching the architecture)."""


def is_url(path: str) -> bool:
    """Whether `path` is written as a URL (scheme://...), not as a local path."""
    return "://" in path


def url_hint(path: str) -> str:
    """For a path that does not exist: a hint when it is a URL (fusion reads local files only), else ''."""
    if not is_url(path):
        return ""
    scheme = path.split("://", 1)[0].lower()
    return (f"; it is a {scheme}:// URL, and fusion never downloads anything: fetch the file yourself "
            "and pass its local path")
