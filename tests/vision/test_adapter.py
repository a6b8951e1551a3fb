"""Pixel shuffle layout (llama4-reference.md §4 item 6) and the VisionAdapter MLP + projector."""

import pytest
import torch
from torch import nn

from vision.adapter import VisionAdapter, pixel_shuffle, pixel_shuffle_tokens


def reference_pixel_shuffle(x, ratio):
    """The Llama 4 reference op, step by step as written in the reference."""
    n, num_patches, channels = x.shape
    h = w = int(num_patches ** 0.5)
    x = x.view(n, h, w, channels)
    x = x.view(n, h, int(w * ratio), int(channels / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * ratio), int(w * ratio), int(channels / ratio**2)).permute(0, 2, 1, 3).contiguous()
    return x.view(n, -1, x.shape[-1])


def test_layout_on_a_4x4_grid_matches_a_hand_written_expectation():
    # 16 patches, one channel each, holding its own row-major index i = 4*y + x.
    x = torch.arange(16.0).view(1, 16, 1)
    expected = torch.tensor([
        [0.0, 1.0, 4.0, 5.0],    # token (0,0): patches (0,0) (0,1) (1,0) (1,1)
        [2.0, 3.0, 6.0, 7.0],    # token (0,1): patches (0,2) (0,3) (1,2) (1,3)
        [8.0, 9.0, 12.0, 13.0],  # token (1,0): patches (2,0) (2,1) (3,0) (3,1)
        [10.0, 11.0, 14.0, 15.0],  # token (1,1): patches (2,2) (2,3) (3,2) (3,3)
    ]).view(1, 4, 4)
    assert torch.equal(pixel_shuffle(x, 0.5), expected)
    assert torch.equal(reference_pixel_shuffle(x, 0.5), expected)  # the reference op agrees with its description


def test_layout_with_several_channels_keeps_each_patch_contiguous():
    # channel c of patch i holds 10*i + c: the output concatenates whole patches, not interleaved channels
    x = (10 * torch.arange(16.0).view(16, 1) + torch.arange(3.0).view(1, 3)).view(1, 16, 3)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 4, 12)
    assert out[0, 1].tolist() == [20, 21, 22, 30, 31, 32, 60, 61, 62, 70, 71, 72]  # patches 2, 3, 6, 7


@pytest.mark.parametrize("ratio, side, channels", [(0.5, 24, 8), (0.5, 2, 1), (0.25, 8, 4), (1.0, 3, 2)])
def test_equals_the_reference_op_on_random_features(ratio, side, channels):
    x = torch.randn(3, side * side, channels)
    assert torch.equal(pixel_shuffle(x, ratio), reference_pixel_shuffle(x, ratio))


def test_llama4_sizes_give_144_tokens_per_tile():
    assert pixel_shuffle(torch.zeros(2, 576, 1408)).shape == (2, 144, 5632)
    assert pixel_shuffle_tokens(576, 0.5) == 144


@pytest.mark.parametrize("shape, ratio, message", [
    ((1, 15, 4), 0.5, "square"), ((1, 9, 4), 0.5, "divisible"), ((1, 16, 4), 0.3, "1/k"), ((16, 4), 0.5, r"\[N, P, C\]"),
])
def test_bad_shapes_and_ratios_are_refused(shape, ratio, message):
    with pytest.raises(ValueError, match=message):
        pixel_shuffle(torch.zeros(shape), ratio)


def test_adapter_is_shuffle_then_two_gelu_layers_then_projector():
    torch.manual_seed(0)
    adapter = VisionAdapter(in_dim=8, hidden_dim=16, out_dim=12)
    assert adapter.fc1.weight.shape == (16, 32) and adapter.fc2.weight.shape == (16, 16)
    assert adapter.projector.weight.shape == (12, 16)
    assert all(module.bias is None for module in (adapter.fc1, adapter.fc2, adapter.projector))
    patches = torch.randn(2, 16, 8)
    gelu = nn.functional.gelu
    shuffled = reference_pixel_shuffle(patches, 0.5)
    expected = gelu(gelu(shuffled @ adapter.fc1.weight.T) @ adapter.fc2.weight.T) @ adapter.projector.weight.T
    out = adapter(patches)
    assert out.shape == (2, 4, 12)
    assert torch.allclose(out, expected, atol=1e-6)
    assert adapter.tokens_per_image(16) == 4 and adapter.tokens_per_image(576) == 144


def test_projector_is_a_separately_named_submodule():
    adapter = VisionAdapter(in_dim=4, hidden_dim=8, out_dim=6)
    assert [name for name, _ in adapter.named_parameters()] == ["fc1.weight", "fc2.weight", "projector.weight"]
    assert [name for name, _ in adapter.projector.named_parameters()] == ["weight"]


def test_adapter_refuses_features_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"\[N, P, 8\]"):
        VisionAdapter(8, 16, 12)(torch.zeros(1, 16, 4))


def test_position_embedding_adds_one_learned_row_per_token_position():
    torch.manual_seed(0)
    plain = VisionAdapter(in_dim=8, hidden_dim=16, out_dim=12)
    placed = VisionAdapter(in_dim=8, hidden_dim=16, out_dim=12, position_tokens=4)
    placed.load_state_dict(plain.state_dict(), strict=False)  # same MLP, plus the embedding
    assert placed.position_embedding.shape == (4, 12) and placed.position_embedding.requires_grad
    patches = torch.randn(3, 16, 8)
    assert torch.allclose(placed(patches), plain(patches) + placed.position_embedding, atol=1e-6)
    same = torch.randn(1, 1, 8).expand(1, 16, 8)  # one feature everywhere: only the position tells tokens apart
    out = placed(same)[0]
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i + 1, 4))
    assert [name for name, _ in plain.named_parameters()] == ["fc1.weight", "fc2.weight", "projector.weight"]


def test_position_embedding_refuses_another_grid():
    adapter = VisionAdapter(8, 16, 12, position_tokens=4)
    with pytest.raises(ValueError, match="4 token positions, but these patches give 9 tokens"):
        adapter(torch.zeros(1, 36, 8))
    with pytest.raises(ValueError, match="position_tokens must be at least 1"):
        VisionAdapter(8, 16, 12, position_tokens=0)


def test_rows_cols_position_embedding_gives_each_token_its_row_plus_its_column():
    torch.manual_seed(0)
    plain = VisionAdapter(in_dim=8, hidden_dim=16, out_dim=12)
    placed = VisionAdapter(in_dim=8, hidden_dim=16, out_dim=12, position_tokens=9, position_embedding="rows_cols")
    placed.load_state_dict(plain.state_dict(), strict=False)
    assert [n for n, _ in placed.named_parameters()] == ["position_rows", "position_cols", "fc1.weight",
                                                         "fc2.weight", "projector.weight"]
    assert placed.position_rows.shape == placed.position_cols.shape == (3, 12)
    patches = torch.randn(2, 36, 8)  # a 6x6 patch grid -> a 3x3 token grid
    added = placed(patches) - plain(patches)
    for y in range(3):
        for x in range(3):
            expected = placed.position_rows[y] + placed.position_cols[x]
            assert torch.allclose(added[:, 3 * y + x], expected.expand(2, 12), atol=1e-6)
    # what a row's vector learns holds for every token in that row: one gradient reaches all three
    placed(patches)[:, 0:3].sum().backward()
    assert placed.position_rows.grad[0].abs().sum() > 0 and placed.position_rows.grad[1:].abs().sum() == 0
    assert (placed.position_cols.grad.abs().sum(dim=1) > 0).all()


def test_rows_cols_position_embedding_needs_a_square_grid_and_a_known_kind():
    with pytest.raises(ValueError, match="square token grid, got 6 tokens"):
        VisionAdapter(8, 16, 12, position_tokens=6, position_embedding="rows_cols")
    with pytest.raises(ValueError, match=r"position_embedding must be one of \['per_token', 'rows_cols'\]"):
        VisionAdapter(8, 16, 12, position_tokens=9, position_embedding="2d")


def test_a_grid_the_ratio_does_not_divide_names_the_ratios_that_fit():
    """ViT-B/32 at 224 px has 7x7 patches, which 2x2 blocks cannot cover: the error says what would work."""
    with pytest.raises(ValueError, match=r"7x7 grid.*ratio that fits it \(1\.0, which keeps every patch\).*a multiple "
                                         r"of 2 patches per side"):
        pixel_shuffle_tokens(49, 0.5)
    with pytest.raises(ValueError, match=r"6x6 grid.*\(1/2, 1/3 or 1\.0"):
        pixel_shuffle(torch.zeros(1, 36, 2), 0.25)
