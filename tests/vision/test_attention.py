"""The ViT's attention runs in float32 under CPU bf16 autocast, with the same parameters and results."""
import copy
from unittest import mock

import torch
from torch import nn

from vision import VisionEncoder, VisionEncoderConfig
from vision.attention import Float32CpuAttention


def tiny_encoder():
    torch.manual_seed(0)
    return VisionEncoder(VisionEncoderConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, stem="conv"))


def test_vit_blocks_attend_in_float32_under_cpu_autocast_and_match_torchs_attention():
    encoder = tiny_encoder()
    blocks = encoder.visual.transformer.resblocks
    assert all(type(b.attn) is Float32CpuAttention for b in blocks)
    reference = copy.deepcopy(encoder)
    for b in reference.visual.transformer.resblocks:
        b.attn.__class__ = nn.MultiheadAttention
    assert list(encoder.state_dict()) == list(reference.state_dict())  # same checkpoint keys
    pixels = torch.randn(3, 3, 32, 32)
    assert torch.equal(encoder(pixels), reference(pixels))  # float32: torch's own path, bit for bit
    exact = reference(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, torchs = encoder(pixels), reference(pixels)
    assert ours.dtype == torchs.dtype
    # ours attends in float32, so it is at least as close to the float32 result as bf16 attention is
    assert (ours.float() - exact).abs().max() <= (torchs.float() - exact).abs().max() * 1.5
    assert torch.allclose(ours.float(), exact, atol=0.1, rtol=0.05)
    # every block's attention itself runs in float32 on what the bf16 projection gave (the comparisons above
    # are dominated by the bf16 projections and would pass with bf16 attention too)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", recorded), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(pixels)
    assert seen == [(torch.float32,) * 3 + (False,)] * len(blocks)


def test_float32_cpu_attention_gradients_reach_every_parameter():
    encoder = tiny_encoder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(torch.randn(2, 3, 32, 32)).float().square().mean().backward()
    attn = encoder.visual.transformer.resblocks[0].attn
    for p in (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
