"""Self-attention of the open_clip ViT blocks, attended in float32 on a CPU under bf16 autocast.

open_clip's blocks use ``nn.MultiheadAttention``. Under CPU bf16 autocast its projections gain from bf16,
but the CPU flash-attention kernel is slower in bf16 than in float32 (the same holds for the decoder:
``fusion.attention.attend``). ``Float32CpuAttention`` is ``nn.MultiheadAttention`` with the very same
parameters and state-dict keys; on that one path (CPU, autocast on, self-attention, batch first, no
attention weights asked for, no padding mask) it projects under autocast and attends in float32. Every
other call is ``nn.MultiheadAttention``'s own.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Float32CpuAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose CPU-autocast self-attention runs the attention itself in float32."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        fast = (query.device.type == "cpu" and torch.is_autocast_enabled("cpu") and query is key and key is value
                and self.batch_first and self._qkv_same_embed_dim and self.in_proj_bias is not None
                and not need_weights and key_padding_mask is None and not is_causal and query.dim() == 3)
        if not fast:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        B, T, E = query.shape
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # autocast dtype
        q, k, v = qkv.view(B, T, 3, heads, E // heads).permute(2, 0, 3, 1, 4)  # each [B, heads, T, hd]
        mask = attn_mask
        if mask is not None and mask.dim() == 3:  # [B * heads, T, T] -> [B, heads, T, T]
            mask = mask.view(B, heads, T, T)
        with torch.autocast("cpu", enabled=False):
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.float()
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        out = out.to(qkv.dtype).transpose(1, 2).reshape(B, T, E)
        return self.out_proj(out), None


def attend_in_float32_on_cpu(module: nn.Module) -> nn.Module:
    """Make every ``nn.MultiheadAttention`` inside `module` a ``Float32CpuAttention`` (same parameters)."""
    for sub in module.modules():
        if type(sub) is nn.MultiheadAttention:
            sub.__class__ = Float32CpuAttention
    return module
