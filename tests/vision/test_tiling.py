"""Llama 4 tiling (llama4-reference.md §5): canvas choice, resize target, tile order, thumbnail."""

import random

import pytest
import torch
from PIL import Image

from vision.tiling import candidate_canvases, find_best_canvas, fit_size, num_tiles, tile_image

S = 336


def _hf_style_best_fit(height, width, tile_size, max_tiles):
    """An independent float re-statement of HF ``get_best_fit`` (argmin area among ties)."""
    canvases = [(a, b) for n in range(max_tiles, 0, -1) for a in range(1, n + 1) if n % a == 0 for b in [n // a]]
    resolutions = torch.tensor([(a * tile_size, b * tile_size) for a, b in canvases], dtype=torch.float64)
    scale_h = resolutions[:, 0] / height
    scale_w = resolutions[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    tied = resolutions[scales == chosen]
    best = tied[torch.argmin(tied[:, 0] * tied[:, 1])]
    return int(best[0]) // tile_size, int(best[1]) // tile_size


def test_candidates_are_every_grid_within_the_tile_budget():
    assert candidate_canvases(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert len(candidate_canvases(16)) == sum(16 // a for a in range(1, 17))
    with pytest.raises(ValueError, match="max_tiles"):
        candidate_canvases(0)


def test_wide_image_gets_two_tiles_and_ties_go_to_the_smallest_canvas():
    # 336x672: (1,2), (1,3), (1,4) and (2,2) all give scale exactly 1; the smallest, (1,2), wins.
    assert find_best_canvas(336, 672, S, 4) == (1, 2)
    assert find_best_canvas(672, 336, S, 4) == (2, 1)


def test_tiny_image_is_upscaled_only_to_one_tile():
    assert find_best_canvas(10, 20, S, 16) == (1, 1)
    # the target box is clamped to one tile, so a 10x20 image grows to 168x336, not to a bigger canvas
    assert fit_size(10, 20, S, S, S) == (168, 336)


def test_large_image_takes_the_least_shrinking_canvas():
    # No canvas of <= 4 tiles holds 3000x3000 without shrinking: the largest scale (2x2) wins.
    assert find_best_canvas(3000, 3000, S, 4) == (2, 2)
    assert fit_size(3000, 3000, 2 * S, 2 * S, S) == (672, 672)
    # Downscale ties: (3,1) and (4,1) both scale by 336/1000; the smaller (3,1) wins.
    assert find_best_canvas(3000, 1000, S, 4) == (3, 1)


def test_smallest_upscale_is_preferred_over_a_bigger_canvas():
    # 5000x100 with 16 tiles: (15,1) already fits (scale 1.008); (16,1) would upscale more.
    assert find_best_canvas(5000, 100, S, 16) == (15, 1)


def test_matches_an_independent_float_statement_of_the_reference():
    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(1, 4000), rng.randint(1, 4000)
        max_tiles = rng.choice([1, 2, 4, 6, 9, 16])
        assert find_best_canvas(height, width, S, max_tiles) == _hf_style_best_fit(height, width, S, max_tiles), (
            height, width, max_tiles)


def test_fit_size_keeps_aspect_and_floors_the_free_side():
    assert fit_size(100, 50, S, S, S) == (336, 168)
    assert fit_size(1000, 500, 2 * S, S, S) == (672, 336)
    assert fit_size(336, 500, S, 2 * S, S) == (336, 500)  # fits: no resize at all
    assert fit_size(300, 1000, S, S, S) == (100, 336)  # 300 * 336/1000 = 100.8 -> 100


def _solid(width, height, colour):
    return Image.new("RGB", (width, height), colour)


def test_two_tiles_split_left_right_and_the_thumbnail_comes_last():
    image = _solid(672, 336, (255, 0, 0))
    image.paste(_solid(336, 336, (0, 0, 255)), (336, 0))  # right half blue
    tiles, grid = tile_image(image, S, 4)
    assert grid == (1, 2)
    assert tiles.shape == (3, 3, S, S) and tiles.dtype == torch.float32
    red, blue = torch.tensor([1.0, 0, 0]).view(3, 1, 1), torch.tensor([0, 0, 1.0]).view(3, 1, 1)
    assert torch.equal(tiles[0], red.expand(3, S, S))
    assert torch.equal(tiles[1], blue.expand(3, S, S))
    # the thumbnail is the whole image squeezed into one tile: red on the left, blue on the right
    assert torch.allclose(tiles[2][:, :, :160], red.expand(3, S, 160))
    assert torch.allclose(tiles[2][:, :, 176:], blue.expand(3, S, 160))
    assert num_tiles(*grid) == 3


def test_tiles_are_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    image = _solid(2 * S, 2 * S, (0, 0, 0))
    for index, colour in enumerate(colours):
        image.paste(_solid(S, S, colour), ((index % 2) * S, (index // 2) * S))
    tiles, grid = tile_image(image, S, 4)
    assert grid == (2, 2) and tiles.shape[0] == 5
    for index, colour in enumerate(colours):
        expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
        assert torch.equal(tiles[index], expected.expand(3, S, S)), index


def test_single_tile_has_no_thumbnail_and_is_padded_bottom_right_with_fill():
    tiles, grid = tile_image(_solid(20, 10, (255, 255, 255)), 32, 16, fill=(0.25, 0.5, 0.75))
    assert grid == (1, 1) and tiles.shape == (1, 3, 32, 32) and num_tiles(*grid) == 1
    assert torch.equal(tiles[0, :, :16, :], torch.ones(3, 16, 32))  # 10x20 -> 16x32, top-left
    assert torch.equal(tiles[0, :, 16:, :], torch.tensor([0.25, 0.5, 0.75]).view(3, 1, 1).expand(3, 16, 32))


def test_padding_on_the_right_of_a_multi_tile_canvas_is_black_by_default():
    tiles, grid = tile_image(_solid(500, 336, (255, 255, 255)), S, 2)
    assert grid == (1, 2)
    assert torch.equal(tiles[1, :, :, : 500 - S], torch.ones(3, S, 500 - S))  # image, unresized
    assert torch.equal(tiles[1, :, :, 500 - S:], torch.zeros(3, S, 2 * S - 500))  # black padding


def test_tile_image_rejects_non_rgb_input():
    with pytest.raises(TypeError, match="load_image"):
        tile_image(Image.new("L", (8, 8)), 8, 1)
