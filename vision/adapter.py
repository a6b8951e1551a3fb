"""The Llama 4 vision adapter: pixel shuffle, a two-layer GELU MLP, then a linear projector.

``[N, P, C]`` patch features -> pixel shuffle -> ``[N, P*r^2, C/r^2]`` -> fc1 -> GELU -> fc2 -> GELU
-> projector -> ``[N, P*r^2, out_dim]`` (llama4-reference.md §4 items 6-8). With r = 0.5 each
output token carries a 2x2 block of patches, so a tile costs a quarter of the tokens.

Optionally (not in Llama 4) a learned embedding of each output token's position is added after the
projector, so that each image token says *where* in the tile it is in its value, not only through the
decoder's RoPE (which moves queries and keys, never values): either one vector per token position
(``"per_token"``) or a vector for its row plus a vector for its column (``"rows_cols"``), which shares what
is learned about a row or a column between all tokens in it (the words "top" or "left" name a whole row or
column).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["pixel_shuffle", "pixel_shuffle_tokens", "VisionAdapter", "POSITION_EMBEDDINGS"]

POSITION_EMBEDDINGS = ("per_token", "rows_cols")


def _shuffle_factor(ratio: float) -> int:
    """The block side ``1 / ratio`` (2 for ratio 0.5); it must be a whole number."""
    if not 0 < ratio <= 1:
        raise ValueError(f"pixel shuffle ratio must be in (0, 1], got {ratio}")
    factor = round(1 / ratio)
    if not math.isclose(factor * ratio, 1.0, rel_tol=1e-9):
        raise ValueError(f"pixel shuffle ratio must be 1/k for a whole k (0.5, 0.25, ...), got {ratio}")
    return factor


def _grid_side(num_patches: int, factor: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {num_patches} patches (not a square number)")
    if side % factor:
        fitting = [f"1/{k}" for k in range(2, side) if side % k == 0]
        fitting = (", ".join(fitting) + " or " if fitting else "") + "1.0, which keeps every patch"
        raise ValueError(f"pixel shuffle with block {factor}x{factor} needs a grid side divisible by {factor}, "
                         f"got a {side}x{side} grid (an encoder with {side} patches per side: image size / patch "
                         f"size); use a pixel shuffle ratio that fits it ({fitting}), or an encoder with a multiple "
                         f"of {factor} patches per side")
    return side


def pixel_shuffle_tokens(num_patches: int, ratio: float = 0.5) -> int:
    """Tokens left after pixel shuffle: ``num_patches * ratio**2`` (576 patches -> 144 at 0.5)."""
    factor = _shuffle_factor(ratio)
    side = _grid_side(num_patches, factor)
    return (side // factor) ** 2


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Merge each ``k x k`` block of patches (``k = 1/ratio``) into one token: ``[N, P, C] -> [N, P/k², C·k²]``.

    Patches are read row-major from a square grid of side ``H = sqrt(P)``. Output token ``(y', x')``
    is row-major over the ``H/k x H/k`` grid, and its channels are the patches of its block
    concatenated row-major; for k = 2: ``(2y', 2x'), (2y', 2x'+1), (2y'+1, 2x'), (2y'+1, 2x'+1)``.

    This equals the Llama 4 reference op ``view(n,H,W·r,C/r) -> permute(0,2,1,3) ->
    view(n,H·r,W·r,C/r²) -> permute(0,2,1,3)`` (checked element by element in the tests).
    """
    if x.ndim != 3:
        raise ValueError(f"pixel_shuffle expects patch features [N, P, C], got shape {tuple(x.shape)}")
    batch, num_patches, channels = x.shape
    factor = _shuffle_factor(ratio)
    side = _grid_side(num_patches, factor)
    small = side // factor
    x = x.reshape(batch, small, factor, small, factor, channels)  # [N, y', dy, x', dx, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, y', x', dy, dx, C]
    return x.reshape(batch, small * small, factor * factor * channels)  # [N, P/k², k²·C]


class VisionAdapter(nn.Module):
    """Pixel shuffle -> fc1 -> GELU -> fc2 -> GELU -> projector (Llama 4 ``PixelShuffleMLP`` + projector).

    Args:
        in_dim: encoder width C.
        hidden_dim: MLP width (Llama 4: 4096).
        out_dim: decoder width (Llama 4 Scout: 5120).
        ratio: pixel shuffle ratio r (0.5 merges 2x2 patches).
        position_tokens: when given, the tokens per tile, and a learned embedding of each token's place in the
            shuffled grid (the same for every tile and video frame) is added to the output. ``None`` (the
            default, as Llama 4): no such embedding.
        position_embedding: ``"per_token"``: one learned ``[position_tokens, out_dim]`` row per token position
            (parameter ``position_embedding``); ``"rows_cols"``: learned ``[side, out_dim]`` rows
            (``position_rows``) and columns (``position_cols``) of the square token grid, token (y, x)
            getting ``position_rows[y] + position_cols[x]``.

    ``projector`` is its own submodule so training can give it a separate learning rate.
    No layer has a bias, as in Llama 4; GELU is the exact (erf) one.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, ratio: float = 0.5,
                 position_tokens: int | None = None, position_embedding: str = "per_token"):
        super().__init__()
        factor = _shuffle_factor(ratio)
        self.in_dim, self.hidden_dim, self.out_dim, self.ratio = in_dim, hidden_dim, out_dim, ratio
        self.fc1 = nn.Linear(in_dim * factor * factor, hidden_dim, bias=False)  # C/r² -> hidden
        self.fc2 = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.act = nn.GELU()
        self.projector = nn.Linear(hidden_dim, out_dim, bias=False)
        self.position_embedding = self.position_rows = self.position_cols = None
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"VisionAdapter: position_embedding must be one of {list(POSITION_EMBEDDINGS)}, "
                             f"got {position_embedding!r}")
        if position_tokens is not None:
            if position_tokens < 1:
                raise ValueError(f"VisionAdapter: position_tokens must be at least 1, got {position_tokens}")
            if position_embedding == "per_token":
                self.position_embedding = nn.Parameter(torch.randn(position_tokens, out_dim) * 0.02)
            else:
                side = math.isqrt(position_tokens)
                if side * side != position_tokens:
                    raise ValueError(f"VisionAdapter: rows_cols position embedding needs a square token grid, "
                                     f"got {position_tokens} tokens per tile")
                self.position_rows = nn.Parameter(torch.randn(side, out_dim) * 0.02)
                self.position_cols = nn.Parameter(torch.randn(side, out_dim) * 0.02)

    def tokens_per_image(self, num_patches: int) -> int:
        """Output tokens for one tile of ``num_patches`` patches: ``num_patches * ratio**2``."""
        return pixel_shuffle_tokens(num_patches, self.ratio)

    def token_positions(self) -> torch.Tensor | None:
        """The ``[tokens per tile, out_dim]`` embedding added to each tile's tokens (row-major), or None."""
        if self.position_rows is not None:
            side, dim = self.position_rows.shape
            return (self.position_rows[:, None, :] + self.position_cols[None, :, :]).reshape(side * side, dim)
        return self.position_embedding

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, P, in_dim]`` patch features -> ``[N, P * ratio**2, out_dim]`` decoder embeddings."""
        if patches.ndim != 3 or patches.shape[-1] != self.in_dim:
            raise ValueError(f"VisionAdapter expects patch features [N, P, {self.in_dim}], "
                             f"got shape {tuple(patches.shape)}")
        x = pixel_shuffle(patches, self.ratio)  # [N, P·r², C/r²]
        x = self.act(self.fc1(x))  # [N, P·r², hidden]
        x = self.act(self.fc2(x))  # [N, P·r², hidden]
        x = self.projector(x)  # [N, P·r², out_dim]
        positions = self.token_positions()
        if positions is not None:
            if x.shape[1] != positions.shape[0]:
                raise ValueError(f"VisionAdapter: the position embedding has {positions.shape[0]} "
                                 f"token positions, but these patches give {x.shape[1]} tokens per tile")
            x = x + positions.to(x.dtype)
        return x
