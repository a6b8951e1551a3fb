"""Llama 4 attention: GQA through `scaled_dot_product_attention`, RoPE or NoPE, QK norm, temperature
tuning, and the masks (causal, chunked, padding, packed documents), all built from token positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder_config import DecoderConfig
from .kv_cache import LayerKV
from .rope import apply_rope


def build_attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, *, chunk_size: int | None = None,
                         k_valid: torch.Tensor | None = None, q_segments: torch.Tensor | None = None,
                         k_segments: torch.Tensor | None = None, q_branches: torch.Tensor | None = None,
                         k_branches: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query may see: [B, 1, Tq, Tk] bool (True = attend).

    allowed(q, k) = k_pos <= q_pos                        (causal, by position)
                  and k_pos // C == q_pos // C            (chunked layers: chunks aligned to absolute positions)
                  and k is a real token                   (padding, empty cache slots)
                  and segment(k) == segment(q)            (packed samples never see each other)
                  and branch(k) in (branch(q), 0)         (branches of a sample share its prefix, branch 0,
                                                           and never see each other)
    """
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, Tq, Tk]
    if chunk_size is not None:
        allowed &= (k_pos // chunk_size)[:, None, :] == (q_pos // chunk_size)[:, :, None]
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    if q_segments is not None:
        allowed &= k_segments[:, None, :] == q_segments[:, :, None]
    if q_branches is not None:
        allowed &= (k_branches[:, None, :] == q_branches[:, :, None]) | (k_branches[:, None, :] == 0)
    return allowed[:, None]


@dataclass
class AttentionPlan:
    """What one kind of layer (full or chunked) attends to in this forward; shared by its layers.

    Exactly one of `mask` and `is_causal` is used. With a cache, `slots` says where the new K/V go and
    `concat` whether keys are the cache before the write plus the new tokens (a prefill longer than a
    chunk ring) or simply the cache after the write.
    """

    mask: torch.Tensor | None = None
    is_causal: bool = False
    slots: torch.Tensor | None = None
    concat: bool = False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, enable_gqa: bool) -> torch.Tensor:
    """`scaled_dot_product_attention` for [B, heads, T, hd] inputs, under `plan`'s mask (or causal flag).

    On a CPU, half-precision inputs (bf16 autocast) are attended in float32 and the result cast back: the
    CPU flash kernel is slower in bf16 than in float32 (forward + backward at 32 x 8 heads x 202 tokens x 32
    dims: 76 ms vs 49 ms on the project's 2-core box), while the matmuls around it do gain from bf16.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=plan.mask,
                                                 is_causal=plan.is_causal, enable_gqa=enable_gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.is_causal,
                                          enable_gqa=enable_gqa)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x), computed in float32, returned in x's dtype (no weight)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.use_rope = not config.is_nope_layer(layer_index)
        self.use_qk_norm = config.use_qk_norm and self.use_rope  # weightless, after RoPE, RoPE layers only
        self.use_temperature = config.attn_temperature_tuning and not self.use_rope
        self.eps = config.rms_norm_eps
        # a plain bool, decided here: compiled with dynamic shapes, `num_kv_heads != num_heads` in forward would be a
        # symbolic bool that scaled_dot_product_attention refuses, breaking the block's graph at its attention
        self.enable_gqa = bool(config.num_kv_heads != config.num_heads)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], temperature: torch.Tensor | None,
                plan: AttentionPlan, kv: LayerKV | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, hd]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.use_qk_norm:
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.use_temperature:
            q = (q * temperature[:, :, None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]

        if kv is not None:
            if plan.concat:
                old_k, old_v = (t.clone() for t in kv.read())  # the write below reuses these slots
                kv.write(plan.slots, k, v)
                k, v = torch.cat((old_k, k.to(old_k.dtype)), dim=2), torch.cat((old_v, v.to(old_v.dtype)), dim=2)
            else:
                kv.write(plan.slots, k, v)
                k, v = kv.read()
            k, v = k.to(q.dtype), v.to(q.dtype)

        out = attend(q, k, v, plan, enable_gqa=self.enable_gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
