"""Where images and videos go in the token sequence, and how many tokens each one takes.

These are plain descriptions (no pixels, no vision code): the vision side decides the
tiling and how many patch embeddings a tile yields; the tokenizer lays out exactly that
many ``<|patch|>`` tokens, which the fused model later overwrites with the embeddings.

Image layout (Llama 4, llama4-reference.md §5), ``n = tokens_per_tile``:

* 1x1 grid: ``<|image_start|> <|image|> <|patch|>×n <|image_end|>``  (n + 3 tokens)
* h×w grid with more than one tile::

    <|image_start|>
      for each row: for each col: <|patch|>×n, then <|tile_x_separator|> unless last col
                    then <|tile_y_separator|>           (after every row, the last included)
      <|image|> <|patch|>×n                             (the global thumbnail, last)
    <|image_end|>

  for ``3 + n·(h·w+1) + h·(w-1) + h`` tokens.

Video layout (ours): ``<|video_start|>``, then for each frame its timestamp as plain text
(see :func:`format_timestamp`, e.g. ``"1.5s"``) followed by a 1x1 image block of
``tokens_per_frame`` patches, then ``<|video_end|>``.
"""

import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from . import special_tokens as st
from .errors import PlaceholderError


class LayoutPiece(NamedTuple):
    """One piece of a media layout: a control token (``is_special``) or plain text."""

    text: str
    is_special: bool


def integer_scalar(value: object) -> int | None:
    """``value`` as an int if it is an integer scalar (int, numpy integer, 0-d integer tensor), else None.

    Booleans (Python, numpy or tensor) are not integers here.
    """
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return None
    if getattr(value, "ndim", 0) != 0:  # torch lets a 1-element tensor act as an index; these are scalars
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(value: object, name: str, owner: str) -> int:
    """``value`` (see ``integer_scalar``) as an int >= 1, else PlaceholderError."""
    number = integer_scalar(value)
    if number is None or number < 1:
        raise PlaceholderError(f"{owner}: {name}={value!r} must be an int >= 1")
    return number


def format_timestamp(seconds: float) -> str:
    """A frame time as compact text: seconds rounded to 0.01, trailing zeros dropped, ``s`` suffix.

    ``0 -> "0s"``, ``1.5 -> "1.5s"``, ``2.0 -> "2s"``, ``0.25 -> "0.25s"``, ``12.345 -> "12.35s"``
    (rounding as Python's ``format``).
    """
    text = f"{seconds:.2f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text + "s"


@dataclass(frozen=True)
class ImagePlaceholder:
    """An image of ``grid = (rows, cols)`` tiles, each encoded to ``tokens_per_tile`` patch tokens.

    A grid with more than one tile also gets a global thumbnail tile, placed last, so it
    holds ``rows·cols + 1`` tiles' worth of patch tokens.
    """

    tokens_per_tile: int
    grid: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens_per_tile",
                           _positive_int(self.tokens_per_tile, "tokens_per_tile", "ImagePlaceholder"))
        grid = self.grid
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise PlaceholderError(f"ImagePlaceholder: grid={grid!r} must be a (rows, cols) pair")
        object.__setattr__(self, "grid", (_positive_int(grid[0], "grid rows", "ImagePlaceholder"),
                                          _positive_int(grid[1], "grid cols", "ImagePlaceholder")))

    @property
    def is_tiled(self) -> bool:
        """True when the image has more than one tile (and so a global thumbnail)."""
        rows, cols = self.grid
        return rows * cols > 1

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision encoder: ``rows·cols``, plus the thumbnail when tiled."""
        rows, cols = self.grid
        return rows * cols + (1 if self.is_tiled else 0)

    @property
    def num_patch_tokens(self) -> int:
        """How many ``<|patch|>`` tokens the image takes (= patch embeddings it needs)."""
        return self.num_tiles * self.tokens_per_tile

    @property
    def num_tokens(self) -> int:
        """All tokens of the image block, patches, separators and markers included."""
        rows, cols = self.grid
        if not self.is_tiled:
            return self.tokens_per_tile + 3
        return 3 + self.tokens_per_tile * (rows * cols + 1) + rows * (cols - 1) + rows

    def layout(self) -> list[LayoutPiece]:
        """The image block as a list of control tokens (all pieces are special)."""
        patches = [st.PATCH] * self.tokens_per_tile
        tokens = [st.IMAGE_START]
        if self.is_tiled:
            rows, cols = self.grid
            for _row in range(rows):
                for col in range(cols):
                    tokens += patches
                    if col < cols - 1:
                        tokens.append(st.TILE_X_SEPARATOR)
                tokens.append(st.TILE_Y_SEPARATOR)
        tokens.append(st.IMAGE)
        tokens += patches
        tokens.append(st.IMAGE_END)
        return [LayoutPiece(token, True) for token in tokens]


@dataclass(frozen=True)
class VideoPlaceholder:
    """A video of ``len(timestamps)`` frames, each a 1x1 image of ``tokens_per_frame`` patches.

    ``timestamps`` are the frames' times in seconds: finite, >= 0 and in non-decreasing
    order. Any iterable of real numbers will do (a list, a numpy array, a 1-D tensor, numpy
    scalars); they are stored as a tuple of Python floats.
    """

    timestamps: Sequence[float]
    tokens_per_frame: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens_per_frame",
                           _positive_int(self.tokens_per_frame, "tokens_per_frame", "VideoPlaceholder"))
        given = self.timestamps
        if hasattr(given, "tolist"):  # a numpy array or torch tensor: its values as Python numbers
            given = given.tolist()
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise PlaceholderError(
                f"VideoPlaceholder: timestamps={self.timestamps!r} must be a list (or other iterable, e.g. an "
                "array) of frame times in seconds"
            )
        # (elements of list(tensor) are 0-d tensors: their values)
        given = tuple(t.item() if getattr(t, "ndim", None) == 0 and hasattr(t, "item") else t for t in given)
        if not given:
            raise PlaceholderError("VideoPlaceholder: timestamps is empty; a video needs at least one frame")
        times = []
        for index, time in enumerate(given):
            if isinstance(time, bool) or not isinstance(time, numbers.Real) or not math.isfinite(time) or time < 0:
                raise PlaceholderError(
                    f"VideoPlaceholder: timestamps[{index}]={time!r} must be a finite number of seconds >= 0"
                )
            if index and time < given[index - 1]:
                raise PlaceholderError(
                    f"VideoPlaceholder: timestamps[{index}]={time!r} comes before timestamps[{index - 1}]="
                    f"{given[index - 1]!r}; give frames in time order"
                )
            times.append(float(time))
        times = tuple(times)
        object.__setattr__(self, "timestamps", times)

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def num_patch_tokens(self) -> int:
        """How many ``<|patch|>`` tokens the video takes (= patch embeddings it needs)."""
        return self.num_frames * self.tokens_per_frame

    def layout(self) -> list[LayoutPiece]:
        """The video block: markers and frame images (special) and timestamps (text)."""
        frame = ImagePlaceholder(self.tokens_per_frame).layout()
        pieces = [LayoutPiece(st.VIDEO_START, True)]
        for time in self.timestamps:
            pieces.append(LayoutPiece(format_timestamp(time), False))
            pieces += frame
        pieces.append(LayoutPiece(st.VIDEO_END, True))
        return pieces
