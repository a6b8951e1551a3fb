"""Llama 4 image tiling: pick a canvas of whole tiles, fit the image on it, cut it into tiles.

This follows the Llama 4 preprocessing (HF ``Llama4ImageProcessorFast``, Meta
``VariableSizeImageTransform``) step by step:

1. Candidate canvases are ``(rows * S, cols * S)`` for every ``rows * cols <= max_tiles``.
2. Each canvas scales the image by ``min(canvas_h / H, canvas_w / W)``.
3. If any scale is >= 1 (the image fits without shrinking), take the smallest such scale;
   otherwise take the largest scale (the least shrinking). Ties go to the smallest canvas.
4. The image is resized without distortion (bilinear) to fit a target box of
   ``min(max(H, S), canvas_h) x min(max(W, S), canvas_w)``: small images grow only to one tile.
5. It is pasted top-left and the canvas is padded bottom/right.
6. The canvas is split into ``rows x cols`` tiles, row-major.
7. With more than one tile, a global thumbnail (the whole image resized, distorted, to
   ``S x S``) is appended LAST.

Only ``resize_to_max_canvas=False`` (the Llama 4 default) is implemented.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["candidate_canvases", "find_best_canvas", "fit_size", "tile_image", "num_tiles"]


def candidate_canvases(max_tiles: int) -> list[tuple[int, int]]:
    """All tile grids ``(rows, cols)`` with ``rows * cols <= max_tiles``, ordered by rows then cols."""
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
    return [(rows, cols) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles // rows + 1)]


def find_best_canvas(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The tile grid ``(rows, cols)`` Llama 4 picks for a ``height x width`` image.

    Scales are compared exactly (as fractions), so ties are real ties. Among canvases tied at
    scale ``s`` the smallest is ``(ceil(s*H/S), ceil(s*W/S))`` tiles, so the winner is unique.
    """
    _check_size(height, width)
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    candidates = candidate_canvases(max_tiles)
    scales = [
        min(Fraction(rows * tile_size, height), Fraction(cols * tile_size, width)) for rows, cols in candidates
    ]
    upscales = [s for s in scales if s >= 1]
    chosen_scale = min(upscales) if upscales else max(scales)
    tied = [grid for grid, s in zip(candidates, scales) if s == chosen_scale]
    return min(tied, key=lambda grid: grid[0] * grid[1])


def fit_size(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """The ``(new_height, new_width)`` the image is resized to on its canvas.

    The target box is clamped to ``min(max(dim, tile_size), canvas_dim)`` per side (so a small
    image grows only to one tile), then the image is fitted inside it keeping its aspect ratio:
    the limiting side fills the box and the other side is floored.
    """
    _check_size(height, width)
    target_height = min(max(height, tile_size), canvas_height)
    target_width = min(max(width, tile_size), canvas_width)
    scale_height = Fraction(target_height, height)
    scale_width = Fraction(target_width, width)
    if scale_width < scale_height:
        new_width = target_width
        new_height = min(int(height * scale_width), target_height)  # floor
    else:
        new_height = target_height
        new_width = min(int(width * scale_height), target_width)  # floor
    return max(new_height, 1), max(new_width, 1)


def num_tiles(rows: int, cols: int) -> int:
    """Tiles an image on a ``rows x cols`` grid yields: the grid, plus a thumbnail when it has more than one tile."""
    return rows * cols + (1 if rows * cols > 1 else 0)


def tile_image(
    image: Image.Image,
    tile_size: int,
    max_tiles: int,
    fill: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut an RGB image into Llama 4 tiles.

    Args:
        image: an RGB ``PIL.Image`` (see ``vision.image.load_image``).
        tile_size: the tile side S in pixels (the encoder's image size).
        max_tiles: the most tiles the canvas may hold (Llama 4 uses 16).
        fill: the padding colour, per channel in [0, 1]. Llama 4 pads with black (the default);
            ``ImageProcessor`` pads with the normalisation mean so padding normalises to 0.

    Returns:
        ``(tiles, (rows, cols))``: ``tiles`` is a float tensor ``[n_tiles, 3, S, S]`` in [0, 1],
        the ``rows * cols`` canvas tiles row-major, then the global thumbnail when
        ``rows * cols > 1``.
    """
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise TypeError(f"tile_image expects an RGB PIL.Image, got {type(image).__name__}"
                        f"{' mode ' + image.mode if isinstance(image, Image.Image) else ''}; "
                        "load it with vision.image.load_image first")
    if len(fill) != 3:
        raise ValueError(f"fill must have 3 values (one per RGB channel), got {fill!r}")
    width, height = image.size
    rows, cols = find_best_canvas(height, width, tile_size, max_tiles)
    new_height, new_width = fit_size(height, width, rows * tile_size, cols * tile_size, tile_size)

    resized = _to_tensor(image.resize((new_width, new_height), Image.BILINEAR))  # [3, h, w]
    canvas = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1).repeat(1, rows * tile_size, cols * tile_size)
    canvas[:, :new_height, :new_width] = resized  # pad bottom/right: [3, rows*S, cols*S]

    # [3, rows*S, cols*S] -> [3, rows, S, cols, S] -> [rows, cols, 3, S, S] -> [rows*cols, 3, S, S]
    tiles = (
        canvas.view(3, rows, tile_size, cols, tile_size)
        .permute(1, 3, 0, 2, 4)
        .reshape(rows * cols, 3, tile_size, tile_size)
    )
    if rows * cols > 1:
        thumbnail = _to_tensor(image.resize((tile_size, tile_size), Image.BILINEAR))  # [3, S, S]
        tiles = torch.cat([tiles, thumbnail[None]], dim=0)  # [rows*cols + 1, 3, S, S]
    return tiles, (rows, cols)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL.Image`` -> float tensor ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
