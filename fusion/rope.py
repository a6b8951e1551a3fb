"""Positions in Llama 4 attention: RoPE on interleaved pairs, llama3 frequency scaling, and the
query temperature used on NoPE layers.

RoPE rotates the pairs (x[2i], x[2i+1]) of each head (GPT-J / complex-number style, as in Meta's
and Hugging Face's Llama 4), not the two halves of the head.
"""
from __future__ import annotations

import math

import torch

from .decoder_config import RopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/head_dim), i < head_dim/2, with optional llama3 scaling. [head_dim/2] float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # llama3 scaling: keep short wavelengths, divide long ones by `factor`, blend in between.
    original_len = scaling.original_max_position_embeddings
    low_freq_wavelen = original_len / scaling.low_freq_factor
    high_freq_wavelen = original_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor != scaling.low_freq_factor:
        smooth = (original_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        scaled = torch.where(medium, blended, scaled)
    return scaled


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq. positions [B, T] -> two [B, T, 1, head_dim/2] float32 tensors."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, head_dim/2]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x [B, T, heads, head_dim]; computed in float32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, head_dim/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention_temperature(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Query scale on NoPE layers: 1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1). [B, T] float32."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
