"""VisionEncoder: parity with open_clip's own patch tokens, weight files, QuickGELU guard, custom towers, open_clip
imported on first use."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vision.encoder import (ConvPatchStem, VisionEncoder, VisionEncoderConfig, is_quickgelu_weights_file,
                            load_weights_file)
from vision.errors import WeightsError

TINY = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2)


# ---------------------------------------------------------------------------------------------
# Parity with open_clip (the acceptance test): ViT-B-32-quickgelu, random init, no download
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_b32(tmp_path_factory):
    """A randomly initialised open_clip ViT-B-32-quickgelu, its state dict in two files, and references."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()
    folder = tmp_path_factory.mktemp("b32")
    files = {"safetensors": str(folder / "b32.safetensors"), "pt": str(folder / "b32.pt")}
    state = model.state_dict()
    save_file(state, files["safetensors"])
    torch.save(state, files["pt"])
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model.visual.output_tokens = True
        _, last_tokens = model.visual(pixels)
        inner = model.visual.forward_intermediates(pixels, indices=[-2], output_fmt="NLC", intermediates_only=True)
    return dict(files=files, pixels=pixels, last=last_tokens, inner=inner["image_intermediates"][0],
                num_visual_params=sum(p.numel() for p in model.visual.parameters()),
                proj_params=model.visual.proj.numel())


@pytest.mark.parametrize("file_kind", ["safetensors", "pt"])
def test_last_layer_patch_tokens_match_open_clip(clip_b32, file_kind):
    encoder = VisionEncoder.from_open_clip("ViT-B-32-quickgelu", clip_b32["files"][file_kind]).eval()
    with torch.no_grad():
        tokens = encoder(clip_b32["pixels"])
    assert tokens.shape == (2, 49, 768) == clip_b32["last"].shape
    assert (tokens - clip_b32["last"]).abs().max().item() <= 1e-5


def test_inner_layer_matches_open_clip_forward_intermediates(clip_b32):
    encoder = VisionEncoder.from_open_clip("ViT-B-32-quickgelu", clip_b32["files"]["safetensors"], layer=-2).eval()
    with torch.no_grad():
        tokens = encoder(clip_b32["pixels"])
    assert tokens.shape == (2, 49, 768)
    assert (tokens - clip_b32["inner"]).abs().max().item() <= 1e-5
    assert not torch.allclose(tokens, clip_b32["last"], atol=1e-2)  # really a different layer
    assert len(encoder.visual.transformer.resblocks) == 11  # the unused last block is dropped


def test_only_the_image_tower_is_built_and_its_properties_come_from_open_clip(clip_b32):
    encoder = VisionEncoder.from_open_clip("ViT-B-32-quickgelu", clip_b32["files"]["safetensors"])
    names = [name for name, _ in encoder.named_parameters()]
    assert all(name.startswith("visual.") for name in names)
    assert not any("token_embedding" in name or "logit_scale" in name for name in names)
    # everything of open_clip's visual tower except the (unused) projection
    assert sum(p.numel() for p in encoder.parameters()) == clip_b32["num_visual_params"] - clip_b32["proj_params"]
    assert (encoder.image_size, encoder.patch_size, encoder.grid_size, encoder.num_patches, encoder.width) == (
        224, 32, 7, 49, 768)
    assert encoder.mean == open_clip.OPENAI_DATASET_MEAN and encoder.std == open_clip.OPENAI_DATASET_STD
    assert encoder.quick_gelu
    assert all(p.requires_grad and not p.is_meta for p in encoder.parameters())


def test_metaclip_file_on_a_gelu_config_is_refused(clip_b32, tmp_path):
    metaclip_path = tmp_path / "MetaCLIP_b32_400m.safetensors"
    os.symlink(clip_b32["files"]["safetensors"], metaclip_path)
    with pytest.raises(WeightsError) as caught:
        VisionEncoder.from_open_clip("ViT-B-32", metaclip_path)
    message = str(caught.value)
    assert "QuickGELU" in message and "silently wrong" in message and "ViT-B-32-quickgelu" in message
    # the same file on the QuickGELU config loads and matches open_clip
    encoder = VisionEncoder.from_open_clip("ViT-B-32-quickgelu", metaclip_path).eval()
    with torch.no_grad():
        assert (encoder(clip_b32["pixels"]) - clip_b32["last"]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# MetaCLIP detection and the activation guard on a tiny tower
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_state(tmp_path):
    torch.manual_seed(1)
    encoder = VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"))
    return encoder, {name: t.clone() for name, t in encoder.visual.state_dict().items()}


def test_quickgelu_checkpoint_detection_rules(tmp_path, tiny_state):
    # (the test's name must not say "metaclip": pytest's tmp_path contains it)
    _, state = tiny_state
    marked = tmp_path / "tower.safetensors"
    save_file(state, marked, metadata={"source": "MetaCLIP 400M"})
    plain = tmp_path / "plain.safetensors"
    save_file(state, plain)
    assert is_quickgelu_weights_file(marked)
    assert not is_quickgelu_weights_file(plain)
    assert is_quickgelu_weights_file("/models/b32_400m.pt")  # an original release name, no 'metaclip' in it
    assert is_quickgelu_weights_file("/hf/vit_base_patch32_clip_224.metaclip_2pt5b/open_clip_model.safetensors")
    # MetaCLIP 2: open_clip's registry has the ViT-H-14 worldwide (224) release trained with QuickGELU, the others not
    assert is_quickgelu_weights_file("/hf/vit_huge_patch14_clip_224.metaclip2_worldwide/model.safetensors")
    assert not is_quickgelu_weights_file("/hf/vit_huge_patch14_clip_378.metaclip2_worldwide/model.safetensors")

    with pytest.raises(WeightsError, match="QuickGELU"):
        VisionEncoder(VisionEncoderConfig(**TINY, act="gelu"), marked)
    assert VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), marked).quick_gelu
    assert not VisionEncoder(VisionEncoderConfig(**TINY, act="gelu"), plain).quick_gelu
    # a false positive (a folder called "metaclip" holding other weights) can be overridden
    folder = tmp_path / "metaclip_runs"
    folder.mkdir()
    save_file(state, folder / "gelu_tower.safetensors")
    with pytest.raises(WeightsError, match="quickgelu_check=False"):
        VisionEncoder(VisionEncoderConfig(**TINY, act="gelu"), folder / "gelu_tower.safetensors")
    VisionEncoder(VisionEncoderConfig(**TINY, act="gelu"), folder / "gelu_tower.safetensors", quickgelu_check=False)


# Release files and Hugging Face repositories of open_clip's registry, as they appear on disk:
# (model, tag, path). The tests check the registry's own quick_gelu flag for each.
QUICKGELU_RELEASES = {
    "openai-file": ("ViT-B-32", "openai", "/models/ViT-B-32.pt"),
    "openai-converted": ("ViT-L-14", "openai", "/models/ViT-L-14.safetensors"),
    "openai-hf-cache": ("ViT-B-32-quickgelu", "openai",
                        "/hub/models--timm--vit_base_patch32_clip_224.openai/snapshots/0/open_clip_model.safetensors"),
    "laion400m-quickgelu": ("ViT-B-32", "laion400m_e32", "/models/vit_b_32-quickgelu-laion400m_e32-46683a32.pt"),
    "dfn5b-repo-folder": ("ViT-H-14", "dfn5b", "/models/apple/DFN5B-CLIP-ViT-H-14/open_clip_pytorch_model.bin"),
    "dfn2b-hf-cache": ("ViT-B-16", "dfn2b",
                       "/hub/models--apple--DFN2B-CLIP-ViT-B-16/snapshots/0/open_clip_model.safetensors"),
    "mc-v1-file": ("ViT-L-14", "metaclip_400m", "/models/l14_400m.pt"),
    "mc2-worldwide-224": ("ViT-H-14-worldwide", "metaclip2_worldwide",
                          "/hub/models--timm--vit_huge_patch14_clip_224.metaclip2_worldwide/snapshots/0/"
                          "open_clip_model.safetensors"),
}
GELU_RELEASES = {
    "laion2b-file": ("ViT-B-32", "laion2b_e16", "/models/vit_b_32-laion2b_e16-af8dbd0c.pth"),
    "laion2b-hf-cache": ("ViT-B-32", "laion2b_s34b_b79k",
                         "/hub/models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/snapshots/0/open_clip_model.safetensors"),
    "laion400m-gelu": ("ViT-B-16", "laion400m_e32", "/models/vit_b_16-laion400m_e32-55e67d44.pt"),
    "dfn2b-39b": ("ViT-L-14", "dfn2b_s39b", "/models/apple/DFN2B-CLIP-ViT-L-14-39B/open_clip_model.safetensors"),
    "mc2-worldwide-378": ("ViT-H-14-worldwide-378", "metaclip2_worldwide",
                          "/hub/models--timm--vit_huge_patch14_clip_378.metaclip2_worldwide/snapshots/0/"
                          "open_clip_model.safetensors"),
    "mc-altogether": ("ViT-H-14", "metaclip_altogether", "/models/h14_v1.2_altogether.pt"),
}


@pytest.mark.parametrize("model, tag, path", QUICKGELU_RELEASES.values(), ids=QUICKGELU_RELEASES)
def test_quickgelu_releases_of_the_open_clip_registry_are_recognised(model, tag, path):
    assert open_clip.get_pretrained_cfg(model, tag)["quick_gelu"]
    assert is_quickgelu_weights_file(path)
    assert is_quickgelu_weights_file(path.replace("/", "\\"))  # a Windows path


@pytest.mark.parametrize("model, tag, path", GELU_RELEASES.values(), ids=GELU_RELEASES)
def test_gelu_releases_of_the_open_clip_registry_are_not_recognised(model, tag, path):
    assert not open_clip.get_pretrained_cfg(model, tag).get("quick_gelu")
    assert not is_quickgelu_weights_file(path)


def test_a_folder_named_after_a_model_does_not_mark_a_file_as_quickgelu():
    assert not is_quickgelu_weights_file("/models/ViT-B-32/finetuned.safetensors")  # only a release file name does
    assert not is_quickgelu_weights_file("/models/openai/tower.safetensors")


def write_weights(path, state):
    """`state` saved at `path` (its folders made), as safetensors or a torch file by its suffix."""
    path.parent.mkdir(parents=True)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def refusal(path, act, release) -> str:
    """The message refusing the weight file `path` on a tower with activation `act`: it names the release, the
    danger and the way out."""
    with pytest.raises(WeightsError) as caught:
        VisionEncoder(VisionEncoderConfig(**TINY, act=act), path)
    message = str(caught.value)
    assert release in message and "silently wrong" in message and "quickgelu_check=False" in message
    return message


@pytest.mark.parametrize("release", ["openai-hf-cache", "laion400m-quickgelu", "dfn5b-repo-folder", "mc-v1-file",
                                     "mc2-worldwide-224"])
def test_quickgelu_release_file_on_a_gelu_tower_is_refused(tmp_path, tiny_state, release):
    encoder, state = tiny_state
    path = write_weights(tmp_path / QUICKGELU_RELEASES[release][2].lstrip("/"), state)
    message = refusal(path, act="gelu", release=QUICKGELU_RELEASES[release][1])
    assert "QuickGELU" in message and "act='quickgelu'" in message
    # the same file on a QuickGELU tower loads exactly
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        loaded = VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), path)
        assert torch.equal(loaded(pixels), encoder(pixels))


@pytest.mark.parametrize("release", ["laion2b-file", "laion2b-hf-cache", "mc2-worldwide-378"])
def test_gelu_release_file_on_a_gelu_tower_loads(tmp_path, tiny_state, release):
    _, state = tiny_state
    path = write_weights(tmp_path / GELU_RELEASES[release][2].lstrip("/"), state)
    assert not VisionEncoder(VisionEncoderConfig(**TINY, act="gelu"), path).quick_gelu


@pytest.mark.parametrize("release", GELU_RELEASES)
def test_gelu_release_file_on_a_quickgelu_tower_is_refused(tmp_path, tiny_state, release):
    """The mistake open_clip's names invite: 'ViT-B-32-quickgelu' kept while laion2b (GELU) weights are loaded."""
    _, state = tiny_state
    path = write_weights(tmp_path / GELU_RELEASES[release][2].lstrip("/"), state)
    message = refusal(path, act="quickgelu", release=GELU_RELEASES[release][1])
    assert "exact GELU" in message and "act='gelu'" in message
    assert VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), path, quickgelu_check=False).quick_gelu


def test_gelu_release_on_a_named_quickgelu_model_names_its_gelu_config(tmp_path):
    path = tmp_path / GELU_RELEASES["laion2b-hf-cache"][2].lstrip("/")  # refused before it is read
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="uses QuickGELU.*without '-quickgelu' \\('ViT-B-32'\\)"):
        VisionEncoder.from_open_clip("ViT-B-32-quickgelu", path)


@pytest.mark.parametrize("model_name, release", [("ViT-B-32", "openai-file"),
                                                 ("ViT-H-14-worldwide", "mc2-worldwide-224")])
def test_quickgelu_release_on_a_named_gelu_model_names_its_quickgelu_config(tmp_path, model_name, release):
    path = tmp_path / QUICKGELU_RELEASES[release][2].lstrip("/")  # refused before it is read
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=f"uses exact GELU.*'{model_name}-quickgelu'"):
        VisionEncoder.from_open_clip(model_name, path)


def test_pretrained_tags_and_hub_names_are_refused_without_downloading():
    with pytest.raises(WeightsError, match="never downloads.*weights="):
        VisionEncoder.from_open_clip("ViT-B-32-quickgelu", pretrained="metaclip_400m")
    with pytest.raises(ValueError, match="never downloads"):
        VisionEncoder.from_open_clip("hf-hub:timm/vit_base_patch32_clip_224.metaclip_400m")


# ---------------------------------------------------------------------------------------------
# Weight files: formats, errors
# ---------------------------------------------------------------------------------------------


def test_missing_folder_and_unsupported_weight_paths(tmp_path):
    config = VisionEncoderConfig(**TINY)
    with pytest.raises(WeightsError, match="nope.safetensors.*does not exist"):
        VisionEncoder(config, tmp_path / "nope.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="folder.*model.safetensors"):
        VisionEncoder(config, tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match="unsupported format"):
        VisionEncoder(config, tmp_path / "weights.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(WeightsError, match="broken.safetensors"):
        VisionEncoder(config, tmp_path / "broken.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="broken.pt"):
        VisionEncoder(config, tmp_path / "broken.pt")


def test_mismatched_weights_are_refused_with_the_offending_keys(tmp_path, tiny_state):
    _, state = tiny_state
    wider = VisionEncoder(VisionEncoderConfig(**{**TINY, "width": 64}, act="quickgelu")).visual.state_dict()
    path = tmp_path / "wider.safetensors"
    save_file(wider, path)
    with pytest.raises(WeightsError, match=r"shape mismatch: .*conv1.weight: file \(64, 3, 8, 8\) vs model \(32, 3, 8, 8\)"):
        VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), path)

    partial = dict(state)
    del partial["ln_post.weight"]
    partial["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.safetensors"
    save_file(partial, path)
    with pytest.raises(WeightsError) as caught:
        VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), path)
    assert "1 missing from the file: ln_post.weight" in str(caught.value)
    assert "1 not in the model: extra.weight" in str(caught.value)

    text_only = {"token_embedding.weight": torch.zeros(4, 2), "transformer.resblocks.0.ln_1.weight": torch.zeros(2)}
    path = tmp_path / "text.safetensors"
    save_file(text_only, path)
    with pytest.raises(WeightsError, match="text tower"):
        VisionEncoder(VisionEncoderConfig(**TINY), path)

    transformers_clip = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(32, 3, 8, 8),
                         "text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}
    path = tmp_path / "model.safetensors"
    save_file(transformers_clip, path)
    with pytest.raises(WeightsError, match="Hugging Face transformers CLIP checkpoint.*open_clip_model.safetensors"):
        VisionEncoder(VisionEncoderConfig(**TINY), path)


def test_visual_only_and_wrapped_pt_files_load(tmp_path, tiny_state):
    encoder, state = tiny_state
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = encoder(pixels)
    wrapped = tmp_path / "checkpoint.bin"  # {"state_dict": {"module.visual.*": ...}, "epoch": 3}
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    plain = tmp_path / "visual.pth"
    torch.save(state, plain)
    for path in (wrapped, plain):
        loaded = VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), path)
        with torch.no_grad():
            assert torch.equal(loaded(pixels), expected)


def test_pickled_python_objects_need_explicit_trust(tmp_path, tiny_state):
    encoder, state = tiny_state
    path = tmp_path / "original.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="allow_unsafe_pickle=True"):
        load_weights_file(path)
    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = VisionEncoder(VisionEncoderConfig(**TINY, act="quickgelu"), path, allow_unsafe_pickle=True)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), encoder(pixels))


# ---------------------------------------------------------------------------------------------
# Custom towers, config round trip, errors
# ---------------------------------------------------------------------------------------------


def test_custom_tower_defaults_are_the_tiny_cpu_vit():
    encoder = VisionEncoder(VisionEncoderConfig())
    assert (encoder.image_size, encoder.patch_size, encoder.grid_size, encoder.num_patches, encoder.width) == (
        64, 8, 8, 64, 128)
    assert len(encoder.visual.transformer.resblocks) == 3
    assert encoder.visual.transformer.resblocks[0].attn.num_heads == 4
    assert encoder.visual.transformer.resblocks[0].mlp.c_fc.out_features == 512
    assert isinstance(encoder.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert type(VisionEncoder(VisionEncoderConfig(act="quickgelu")).visual.transformer.resblocks[0].mlp.gelu
                ).__name__ == "QuickGELU"
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 64, 128)


@pytest.mark.parametrize("patch, strided_convs", [(8, 3), (16, 4), (2, 1), (14, 0), (7, 0)])
def test_conv_stem_replaces_the_patch_conv_with_the_same_output_grid(patch, strided_convs):
    stem = ConvPatchStem(width=16, patch_size=patch)
    convs = [m for m in stem.layers if isinstance(m, nn.Conv2d)]
    if strided_convs:  # powers of two: overlapping 3x3 convs of stride 2
        assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(3, 2)] * strided_convs
    else:  # other sizes: one patch-sized conv, then 1x1
        assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(patch, patch), (1, 1)]
    assert convs[-1].out_channels == 16
    assert stem(torch.randn(1, 3, 4 * patch, 4 * patch)).shape == (1, 16, 4, 4)


def test_conv_stem_tower_trains_end_to_end():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**TINY, stem="conv"))
    assert isinstance(encoder.visual.conv1, ConvPatchStem)
    tokens = encoder(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 32)
    tokens.square().mean().backward()
    assert encoder.visual.conv1.layers[0].weight.grad.abs().sum() > 0


def test_config_round_trips_and_a_saved_encoder_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    config = VisionEncoderConfig(**TINY, stem="conv", layer=-2, act="quickgelu", mean=(0.5, 0.5, 0.5),
                                 std=(0.5, 0.5, 0.5))
    assert VisionEncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    encoder = VisionEncoder(config)
    assert encoder.mean == (0.5, 0.5, 0.5)
    # a checkpoint: config + state dict -> rebuild -> same outputs
    rebuilt = VisionEncoder(VisionEncoderConfig.from_dict(config.to_dict()))
    rebuilt.load_state_dict(encoder.state_dict())
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt(pixels), encoder(pixels))
    # and the encoder's own tower can be saved as a weight file and loaded back
    path = tmp_path / "tower.safetensors"
    save_file(encoder.visual.state_dict(), path)
    assert torch.equal(VisionEncoder(config, path)(pixels), encoder(pixels))
    with pytest.raises(ValueError, match="unknown settings.*depth"):
        VisionEncoderConfig.from_dict({"depth": 3})


def test_bad_names_and_settings_give_clear_errors():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-32-quickgel'.*ViT-B-32-quickgelu"):
        VisionEncoder(VisionEncoderConfig(model_name="ViT-B-32-quickgel"))
    with pytest.raises(ValueError, match="ResNet"):
        VisionEncoder(VisionEncoderConfig(model_name="RN50"))
    with pytest.raises(ValueError, match="custom tower"):
        VisionEncoderConfig(model_name="ViT-B-32", width=64)
    with pytest.raises(ValueError, match="out of range"):
        VisionEncoder(VisionEncoderConfig(**TINY, layer=2))
    with pytest.raises(ValueError, match="divisible by heads"):
        VisionEncoder(VisionEncoderConfig(**{**TINY, "heads": 3}))
    with pytest.raises(ValueError, match="act"):
        VisionEncoderConfig(act="relu")


@pytest.mark.parametrize("setting, value, says", [
    ("width", 0, "width must be a whole number >= 1, got 0"),  # was a ZeroDivisionError
    ("heads", 0, "heads must be a whole number >= 1, got 0"),  # same
    ("patch_size", 0, "patch_size must be a whole number >= 1, got 0"),  # same
    ("image_size", 0, "image_size must be a whole number >= 1, got 0"),  # built a tower for 0x0 pixels
    ("layers", True, "layers must be a whole number >= 1, got True"),  # built a 1-block tower
    ("mlp_ratio", -1.0, "mlp_ratio must be a number above 0, got -1.0"),  # torch's "negative dimension"
    ("layer", 1.0, "layer must be a whole number (-1 = the last block), got 1.0"),
    ("std", (0.0, 0.5, 0.5), "std needs 3 finite values above 0 (pixels are divided by it)"),
    ("mean", (float("nan"), 0.5, 0.5), "mean needs 3 finite values, got (nan"),
])
def test_a_custom_tower_setting_out_of_its_range_is_named(setting, value, says):
    with pytest.raises(ValueError, match=re.escape(f"VisionEncoderConfig: {says}")):
        VisionEncoderConfig(**{**TINY, setting: value})


def test_forward_checks_the_pixel_shape_and_the_processor_fits_the_encoder():
    encoder = VisionEncoder(VisionEncoderConfig(**TINY, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\].*image_processor"):
        encoder(torch.randn(1, 3, 64, 64))
    processor = encoder.image_processor(max_tiles=4)
    assert (processor.image_size, processor.mean, processor.std, processor.max_tiles) == (
        32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 4)
    pixels, grid = processor(np.zeros((32, 64, 3), np.uint8))
    assert grid == (1, 2) and encoder(pixels).shape == (3, 16, 32)


def test_timm_vit_towers_give_patch_tokens_without_prefix_tokens(tmp_path):
    torch.manual_seed(0)
    encoder = VisionEncoder.from_open_clip("PE-Core-T-16-384").eval()  # a 5M-parameter timm ViT with a class token
    assert (encoder.image_size, encoder.patch_size, encoder.num_patches, encoder.width) == (384, 16, 576, 192)
    assert encoder.mean == (0.5, 0.5, 0.5) and encoder.std == (0.5, 0.5, 0.5)  # what all its open_clip tags use
    pixels = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        tokens = encoder(pixels)
        features = encoder.visual.trunk.forward_features(pixels)  # [1, 1 + 576, 192], final norm applied
    assert encoder.visual.trunk.num_prefix_tokens == 1 and features.shape == (1, 577, 192)
    assert tokens.shape == (1, 576, 192)
    assert torch.allclose(tokens, features[:, 1:], atol=1e-5)
    # its weights reload from a file (this tower has non-persistent RoPE buffers, rebuilt, not loaded)
    path = tmp_path / "pe_core_t.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in encoder.visual.state_dict().items()}, path)
    with torch.no_grad():
        reloaded = VisionEncoder.from_open_clip("PE-Core-T-16-384", path).eval()(pixels)
    assert torch.allclose(reloaded, tokens, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# open_clip is imported when a tower is built, not before
# ---------------------------------------------------------------------------------------------


def test_importing_the_library_and_its_command_leaves_open_clip_for_the_first_tower():
    """`import open_clip` takes seconds (torchvision, and transformers where installed); `import fusion`,
    `pipelines` and the `fusion` command start without it, and building a tower imports it."""
    script = ("import sys\n"
              "import fusion, fusion.cli, pipelines, vision\n"
              "print(sorted(m for m in ('open_clip', 'torchvision', 'transformers') if m in sys.modules))\n"
              "vision.VisionEncoder(vision.VisionEncoderConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2))\n"
              "print('open_clip' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout


def test_an_encoder_built_on_the_meta_device_is_allocated_with_the_buffers_no_file_holds(monkeypatch):
    """`allocate` gives an encoder built on the meta device (as a model is loaded or sharded) its tensors, and a
    tower's non-persistent buffers, which no weight file holds, the values a new tower computes."""
    import vision.encoder

    build = vision.encoder._build_tower

    def with_a_computed_buffer(*args, **kwargs):
        visual = build(*args, **kwargs)
        visual.register_buffer("scales", torch.linspace(1.0, 2.0, 5), persistent=False)
        return visual

    monkeypatch.setattr(vision.encoder, "_build_tower", with_a_computed_buffer)
    with torch.device("meta"):
        encoder = VisionEncoder(VisionEncoderConfig(**TINY))
    assert all(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    assert encoder.allocate("cpu") is encoder
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    assert torch.equal(encoder.visual.scales, torch.linspace(1.0, 2.0, 5))
    assert "visual.scales" not in encoder.state_dict()
