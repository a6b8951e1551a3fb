"""The vision encoder: an open_clip image tower that returns patch tokens ``[N, P, C]``.

Two kinds of tower, both built by open_clip's own vision-tower builder (so no text tower is
ever created):

- a named open_clip model (``open_clip.list_models()``), e.g. the MetaCLIP architectures
  ``ViT-B-32-quickgelu``, ``ViT-B-16-quickgelu``, ``ViT-L-14-quickgelu``; timm-backed ViTs
  (SigLIP, EVA, ...) work too. ResNet / ConvNeXt towers have no patch tokens and are refused.
- a small custom ViT for fast CPU training (``model_name=None`` with ``image_size``,
  ``patch_size``, ``width``, ``layers``, ``heads``, ``mlp_ratio``, ``act``), optionally with a
  convolutional patch stem (``stem="conv"``).

Weights come only from a local file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``) holding a full
open_clip CLIP state dict (keys ``visual.*``) or a visual-only one. Nothing is ever downloaded:
open_clip ``pretrained`` tags are refused.

Output: patch tokens, class token removed, not projected. The last layer is taken after the
final norm (``ln_post``), exactly what ``model.visual.output_tokens = True`` returns; an inner
layer (``layer=-2``, ...) is the raw output of that block, exactly what open_clip's
``forward_intermediates(..., output_fmt='NLC', intermediates_only=True)`` returns.
Blocks after the chosen layer, and the pooling / projection heads, are dropped from the module
after the weights are loaded: they would never receive gradients.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .attention import attend_in_float32_on_cpu
from .checks import is_finite_number, is_whole_number
from .errors import WeightsError
from .image import ImageProcessor

__all__ = ["VisionEncoderConfig", "VisionEncoder", "ConvPatchStem", "load_weights_file", "is_quickgelu_weights_file"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Defaults of a custom tower: the tiny patch-8 ViT measured to train on a laptop CPU.
_CUSTOM_DEFAULTS = dict(image_size=64, patch_size=8, width=128, layers=3, heads=4, mlp_ratio=4.0, act="gelu")
_CUSTOM_FIELDS = tuple(_CUSTOM_DEFAULTS)[:-1]  # the architecture fields a named model takes from open_clip


def _open_clip():
    """open_clip, imported on first use: importing it takes seconds (it imports torchvision and, where it
    is installed, transformers), and only building a tower needs it, so ``import fusion`` and the ``fusion``
    command start without it."""
    import open_clip

    return open_clip


def _is_open_clip_vit(visual: nn.Module) -> bool:
    """Whether ``visual`` is open_clip's own ViT tower (else a timm tower)."""
    from open_clip.transformer import VisionTransformer  # (see _open_clip)

    return isinstance(visual, VisionTransformer)


@dataclass
class VisionEncoderConfig:
    """Settings of a ``VisionEncoder``; JSON-serialisable with ``to_dict`` / ``from_dict``.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``), or ``None`` for a
            custom tower described by the fields below.
        image_size, patch_size, width, layers, heads, mlp_ratio: custom tower shape
            (``None`` = 64, 8, 128, 3, 4, 4.0). Must stay ``None`` with ``model_name``.
        act: ``"gelu"`` or ``"quickgelu"``. ``None``: the open_clip config's choice for a named
            model (``-quickgelu`` names use QuickGELU), ``"gelu"`` for a custom tower.
        stem: ``"patch"`` (one conv, kernel = stride = patch) or ``"conv"`` (``ConvPatchStem``);
            open_clip ViT towers only.
        layer: which block's tokens to return; ``-1`` is the last (after ``ln_post``),
            ``-2`` the one before (raw block output), ``0`` the first.
        mean, std: override the normalisation; ``None`` takes open_clip's.
    """

    model_name: str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    act: str | None = None
    stem: str = "patch"
    layer: int = -1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.act not in (None, "gelu", "quickgelu"):
            raise ValueError(f"VisionEncoderConfig: act must be 'gelu' or 'quickgelu', got {self.act!r}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"VisionEncoderConfig: stem must be 'patch' or 'conv', got {self.stem!r}")
        for name in ("image_size", "patch_size", "width", "layers", "heads"):  # (None: the custom default)
            value = getattr(self, name)
            if value is not None and not (is_whole_number(value) and value >= 1):
                raise ValueError(f"VisionEncoderConfig: {name} must be a whole number >= 1, got {value!r}")
        if self.mlp_ratio is not None and not (is_finite_number(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"VisionEncoderConfig: mlp_ratio must be a number above 0, got {self.mlp_ratio!r}")
        if not is_whole_number(self.layer):
            raise ValueError(f"VisionEncoderConfig: layer must be a whole number (-1 = the last block), "
                             f"got {self.layer!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 3:
                    raise ValueError(f"VisionEncoderConfig: {name} needs 3 values (RGB), got {value}")
                if not all(map(math.isfinite, value)) or (name == "std" and min(value) <= 0):
                    raise ValueError(f"VisionEncoderConfig: {name} needs 3 finite values"
                                     f"{' above 0 (pixels are divided by it)' if name == 'std' else ''}, "
                                     f"got {value}")
                setattr(self, name, value)
        if self.model_name is not None:
            given = [name for name in _CUSTOM_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"VisionEncoderConfig: {given} describe a custom tower, but model_name={self.model_name!r} "
                    "takes its architecture from open_clip; set model_name=None for a custom tower"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable settings."""
        settings = asdict(self)
        for name in ("mean", "std"):
            if settings[name] is not None:
                settings[name] = list(settings[name])
        return settings

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "VisionEncoderConfig":
        """Rebuild from ``to_dict()`` output. Missing keys take their defaults; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"VisionEncoderConfig.from_dict: unknown settings {unknown}; "
                             f"known ones are {sorted(known)}")
        return cls(**settings)


class ConvPatchStem(nn.Module):
    """A small convolutional stem in place of the single patch-embedding conv.

    ``[N, 3, S, S] -> [N, width, S/p, S/p]`` like the conv it replaces. For a power-of-two patch
    ``p = 2^n``: n overlapping 3x3 convs of stride 2 (padding 1), GELU between them, channels growing
    to ``width`` (patch 8, width 128: 3 -> 32 -> 64 -> 128). Other patch sizes: conv ``p x p`` stride
    ``p`` -> GELU -> conv 1x1. Tiny ViTs learn shapes much faster on a CPU with a convolutional stem
    (vlm-lessons.md): overlapping 3x3 filters see edges and corners that one non-overlapping patch
    projection has to learn from scratch.
    """

    def __init__(self, width: int, patch_size: int, in_channels: int = 3):
        super().__init__()
        steps = patch_size.bit_length() - 1
        layers: list[nn.Module] = []
        if patch_size >= 2 and 2 ** steps == patch_size:
            channels = [in_channels] + [max(width >> (steps - 1 - i), 8) for i in range(steps)]
            channels[-1] = width
            for i in range(steps):
                layers.append(nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, stride=2, padding=1,
                                        bias=i < steps - 1))
                if i < steps - 1:
                    layers.append(nn.GELU())
        else:
            hidden = max(width // 2, 1)
            layers += [nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size), nn.GELU(),
                       nn.Conv2d(hidden, width, kernel_size=1, bias=False)]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)  # [N, width, S/p, S/p]


class VisionEncoder(nn.Module):
    """An open_clip image tower returning patch tokens ``[N, P, C]`` (see the module docstring).

    Args:
        config: what to build (``VisionEncoderConfig``).
        weights: a local weight file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``) with a full
            open_clip CLIP state dict (``visual.*`` keys are taken) or a visual-only one.
        allow_unsafe_pickle: ``.pt`` / ``.bin`` files are read with ``torch.load(weights_only=True)``.
            Files that need full unpickling (original OpenAI TorchScript archives, checkpoints
            holding training arguments) are refused unless this is ``True``: unpickling can run
            code, so only set it for files you trust (or convert them once to safetensors).
        quickgelu_check: refuse a QuickGELU-trained file (OpenAI, laion400m quickgelu, DFN,
            MetaCLIP, ... releases; see ``is_quickgelu_weights_file``) on a GELU tower, and a
            release of open_clip's registry trained with exact GELU (laion2b, datacomp, ...) on a
            QuickGELU tower. The check reads the path, so set this to ``False`` only when it
            misfires (e.g. a folder named "metaclip" holding other weights).

    Raises:
        WeightsError: missing / unreadable / mismatched weight file, a QuickGELU-trained file on a
            GELU tower (or a known GELU release on a QuickGELU tower), or a ``pretrained`` tag
            (nothing is downloaded).
        ValueError: an unknown or unsupported model name, or bad settings.
    """

    def __init__(self, config: VisionEncoderConfig | None = None, weights: str | os.PathLike | None = None,
                 *, allow_unsafe_pickle: bool = False, quickgelu_check: bool = True):
        super().__init__()
        self.config = config = copy.deepcopy(config) if config is not None else VisionEncoderConfig()
        embed_dim, vision_cfg, quick_gelu = _tower_settings(config)
        self.quick_gelu = quick_gelu
        # With a weight file, build on the meta device (no random init, which takes seconds for
        # ViT-B and more for ViT-L) and take the file's tensors as they are. Towers with
        # non-persistent buffers (not in any file) are built normally.
        self.visual = _build_tower(config, embed_dim, vision_cfg, quick_gelu, on_meta=weights is not None)
        if weights is not None and _has_non_persistent_buffers(self.visual):
            self.visual = _build_tower(config, embed_dim, vision_cfg, quick_gelu, on_meta=False)
        self._is_timm = not _is_open_clip_vit(self.visual)

        self._num_blocks = len(self._blocks())
        if not -self._num_blocks <= config.layer < self._num_blocks:
            raise ValueError(f"layer={config.layer} is out of range for a tower with {self._num_blocks} blocks "
                             f"(use -{self._num_blocks} .. {self._num_blocks - 1}; -1 is the last)")
        self.layer_index = config.layer % self._num_blocks  # absolute block index

        full_shapes = {name: tuple(t.shape) for name, t in self.visual.state_dict().items()}
        self._prune_to_layer()
        if weights is not None:
            self._load_weights(weights, full_shapes, allow_unsafe_pickle, quickgelu_check)
        self._mean, self._std = _normalisation(config)

    @classmethod
    def from_open_clip(cls, model_name: str, weights: str | os.PathLike | None = None, *, layer: int = -1,
                       pretrained: str | None = None, allow_unsafe_pickle: bool = False,
                       quickgelu_check: bool = True, **settings: Any) -> "VisionEncoder":
        """Build the image tower of an open_clip model.

        Example: ``VisionEncoder.from_open_clip("ViT-B-32-quickgelu", "b32_metaclip_400m.safetensors")``.

        ``pretrained`` exists only to explain that tags are not downloaded: pass ``weights``.
        Other keyword arguments go to ``VisionEncoderConfig`` (``act``, ``stem``, ``mean``, ``std``).
        """
        if pretrained is not None:
            raise WeightsError(
                f"pretrained={pretrained!r}: fusion never downloads weights. Download the file once yourself "
                f"(e.g. open_clip's '{model_name}' / '{pretrained}' release, preferably a .safetensors copy) and "
                "pass its local path as weights='/path/to/file.safetensors'"
            )
        config = VisionEncoderConfig(model_name=model_name, layer=layer, **settings)
        return cls(config, weights, allow_unsafe_pickle=allow_unsafe_pickle, quickgelu_check=quickgelu_check)

    def allocate(self, device) -> "VisionEncoder":
        """The tensors of an encoder built on the meta device (``with torch.device("meta")``), sharded or
        not, allocated on ``device`` and not initialised (every weight is to be written). A tower's
        non-persistent buffers, which no weight file holds, are set as a new tower computes them (building
        one whole tower; none of open_clip's ViTs has such buffers). Returns self."""
        self.to_empty(device=device)
        if _has_non_persistent_buffers(self.visual):
            saved = set(self.visual.state_dict())
            fresh = VisionEncoder(self.config).visual
            with torch.no_grad():
                for name, buffer in fresh.named_buffers():
                    if name not in saved:
                        self.visual.get_buffer(name).copy_(buffer)
        return self

    # --- shape properties ----------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """Input side S in pixels (towers are square)."""
        return int(self._patch_embed_sizes()[0])

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return int(self._patch_embed_sizes()[1])

    @property
    def grid_size(self) -> int:
        """Patches per side: ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, P = ``grid_size ** 2``."""
        return self.grid_size**2

    @property
    def width(self) -> int:
        """Channels C of each patch token."""
        return int(self.visual.trunk.embed_dim if self._is_timm else self.visual.transformer.width)

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel normalisation mean (RGB, pixels in [0, 1])."""
        return self._mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel normalisation std (RGB, pixels in [0, 1])."""
        return self._std

    def image_processor(self, max_tiles: int = 1, **settings: Any) -> ImageProcessor:
        """An ``ImageProcessor`` with this encoder's image size, mean and std."""
        return ImageProcessor(image_size=self.image_size, mean=self.mean, std=self.std, max_tiles=max_tiles, **settings)

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` normalised pixels -> ``[N, P, C]`` patch tokens of the chosen layer."""
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"VisionEncoder expects pixels [N, 3, {size}, {size}], got shape {tuple(pixels.shape)}; "
                             "make them with encoder.image_processor()")
        # After pruning, the chosen block is the last one left: take the last 1 intermediate.
        output = self.visual.forward_intermediates(
            pixels,
            indices=1,
            normalize_intermediates=self._normalize_output,
            intermediates_only=True,
            output_fmt="NLC",
        )
        # [N, P, C], class / prefix tokens removed; a copy, not a view of the tower's tokens (FSDP2 warns of a
        # sharded module returning a view, as an in-place op on one would skip its gradient hooks)
        return output["image_intermediates"][0].clone()

    # --- internals -------------------------------------------------------------------------------

    def _blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks if self._is_timm else self.visual.transformer.resblocks

    def _patch_embed_sizes(self) -> tuple[int, int]:
        if self._is_timm:
            embed = self.visual.trunk.patch_embed
            return embed.img_size[0], embed.patch_size[0]
        return self.visual.image_size[0], self.visual.patch_size[0]

    def _prune_to_layer(self) -> None:
        """Drop blocks after the chosen layer and the heads we never use (projection, pooling)."""
        is_last = self.layer_index == self._num_blocks - 1
        if self._is_timm:
            self._normalize_output = is_last  # timm's final norm
            self.visual.trunk.prune_intermediate_layers([self.layer_index], prune_norm=not is_last, prune_head=True)
            self.visual.head = nn.Identity()
            return
        visual = self.visual
        # The final norm applies to patch tokens only when the tower normalises all tokens before pooling.
        self._normalize_output = is_last and visual.attn_pool is None and not visual.final_ln_after_pool
        visual.prune_intermediate_layers([self.layer_index], prune_norm=not self._normalize_output, prune_head=True)
        visual.attn_pool = None
        visual.attn_pool_contrastive = None

    def _load_weights(self, weights: str | os.PathLike, full_shapes: dict[str, tuple], allow_unsafe_pickle: bool,
                      quickgelu_check: bool) -> None:
        path = _check_weights_path(weights)
        if quickgelu_check and not self._is_timm:
            self._check_activation_of(path)
        state = _visual_state_dict(load_weights_file(path, allow_unsafe_pickle), path)
        expected = self.visual.state_dict()
        pruned_away = set(full_shapes) - set(expected)  # keys the file may carry but we no longer use
        problems = _mismatch_report(state, expected, full_shapes, pruned_away)
        if problems:
            raise WeightsError(f"weight file {path!r} does not match {self._describe()}:\n{problems}\n"
                               "Check that the model name (or custom sizes) is the one these weights were "
                               "trained with.")
        kept = {key: value.to(expected[key].dtype) for key, value in state.items() if key not in pruned_away}
        self.visual.load_state_dict(kept, strict=True, assign=True)
        on_meta = [name for name, t in [*self.visual.named_parameters(), *self.visual.named_buffers()] if t.is_meta]
        if on_meta:  # cannot happen after a strict load unless open_clip adds unsaved state
            raise RuntimeError(f"VisionEncoder: {on_meta[:5]} were not set by {path!r}")

    def _check_activation_of(self, path: str) -> None:
        """WeightsError when ``path`` is known to be trained with the other activation than this tower's."""
        name = repr(self.config.model_name) if self.config.model_name else "this custom tower"
        if not self.quick_gelu:
            source = _quickgelu_source(path)
            if source:
                raise WeightsError(
                    f"weight file {path!r} looks like {source}, which was trained with QuickGELU, "
                    f"but {name} uses exact GELU: the features would be silently wrong. Use the '-quickgelu' "
                    f"model (e.g. '{_quickgelu_name(self.config.model_name)}') or act='quickgelu'. (QuickGELU files "
                    "are recognised by the release file names and Hugging Face repositories that open_clip's "
                    "pretrained registry marks quick_gelu, or by 'metaclip' in the path or safetensors metadata; "
                    "if this file was trained with GELU, pass quickgelu_check=False.)"
                )
            return
        source = _release_of(path, quick_gelu=False)
        if source:
            plain = (self.config.model_name or "").removesuffix("-quickgelu")
            raise WeightsError(
                f"weight file {path!r} looks like {source}, which was trained with exact GELU, but {name} uses "
                "QuickGELU: the features would be silently wrong. Use the model without '-quickgelu'"
                + (f" ('{plain}')" if plain else "") + " or act='gelu'. (GELU files are recognised by the release "
                "file names and Hugging Face repositories of open_clip's pretrained registry; if this file was "
                "trained with QuickGELU, pass quickgelu_check=False.)"
            )

    def _describe(self) -> str:
        if self.config.model_name:
            return f"open_clip model {self.config.model_name!r}"
        return (f"the custom tower (image {self.image_size}, patch {self.patch_size}, width {self.width}, "
                f"{self._num_blocks} layers, stem {self.config.stem!r})")


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _tower_settings(config: VisionEncoderConfig) -> tuple[int, dict[str, Any], bool]:
    """``(embed_dim, vision_cfg, quick_gelu)`` for open_clip's vision-tower builder."""
    if config.model_name is None:
        sizes = {name: getattr(config, name) if getattr(config, name) is not None else _CUSTOM_DEFAULTS[name]
                 for name in _CUSTOM_FIELDS}
        if sizes["width"] % sizes["heads"]:
            raise ValueError(f"custom tower: width {sizes['width']} must be divisible by heads {sizes['heads']}")
        if sizes["image_size"] % sizes["patch_size"]:
            raise ValueError(f"custom tower: image_size {sizes['image_size']} must be a multiple of "
                             f"patch_size {sizes['patch_size']}")
        vision_cfg = dict(image_size=sizes["image_size"], patch_size=sizes["patch_size"], width=sizes["width"],
                          layers=sizes["layers"], head_width=sizes["width"] // sizes["heads"],
                          mlp_ratio=sizes["mlp_ratio"])
        # embed_dim sizes the CLIP projection, which the encoder drops: any value works.
        return sizes["width"], vision_cfg, (config.act or "gelu") == "quickgelu"

    name = config.model_name
    if ":" in name:
        raise ValueError(f"model name {name!r} uses an open_clip schema ('hf-hub:' / 'local-dir:'); fusion never "
                         "downloads. Use a built-in name from open_clip.list_models() and pass the weights file.")
    open_clip = _open_clip()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown open_clip model {name!r}.{hint} See open_clip.list_models().")
    vision_cfg = copy.deepcopy(model_cfg["vision_cfg"])
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ValueError(f"open_clip model {name!r} has a ResNet image tower, which has no patch tokens; "
                         "use a ViT model (e.g. 'ViT-B-32-quickgelu')")
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # never let timm download
    quick_gelu = bool(model_cfg.get("quick_gelu", False)) if config.act is None else config.act == "quickgelu"
    return model_cfg["embed_dim"], vision_cfg, quick_gelu


def _build_tower(config: VisionEncoderConfig, embed_dim: int, vision_cfg: dict[str, Any], quick_gelu: bool,
                 on_meta: bool) -> nn.Module:
    """open_clip's vision tower for ``config``, with the convolutional stem if asked for."""
    from open_clip.model import _build_vision_tower  # open_clip's own builder (stable in 3.x); see _open_clip

    with torch.device("meta") if on_meta else contextlib.nullcontext():
        visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
        if not _is_open_clip_vit(visual):
            _check_timm_vit(visual, config.model_name)
        if config.stem == "conv":
            if not _is_open_clip_vit(visual):
                raise ValueError(f"stem='conv' needs an open_clip ViT tower; {config.model_name!r} is a timm tower")
            visual.conv1 = ConvPatchStem(visual.transformer.width, visual.patch_size[0])
        if _is_open_clip_vit(visual):
            attend_in_float32_on_cpu(visual)
    return visual


def _has_non_persistent_buffers(module: nn.Module) -> bool:
    saved = set(module.state_dict())
    return any(name not in saved for name, _ in module.named_buffers())


def _check_timm_vit(visual: nn.Module, name: str | None) -> None:
    trunk = getattr(visual, "trunk", None)
    needed = ("patch_embed", "blocks", "num_prefix_tokens", "forward_intermediates", "prune_intermediate_layers")
    if trunk is None or not all(hasattr(trunk, attr) for attr in needed):
        raise ValueError(f"open_clip model {name!r} has an image tower without ViT patch tokens "
                         f"({type(trunk or visual).__name__}); use a ViT model (e.g. 'ViT-B-32-quickgelu')")


def _normalisation(config: VisionEncoderConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std: the config's override, else what open_clip's preprocessing uses for this model.

    With a local file there is no pretrained tag, so we take the mean/std that all of the model's
    open_clip tags agree on (e.g. 0.5 for SigLIP), or open_clip's default (OpenAI CLIP) otherwise.
    """
    open_clip = _open_clip()
    default = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    mean, std = default
    if config.model_name is not None:
        tag_values = set()
        for tag in open_clip.list_pretrained_tags_by_model(config.model_name):
            tag_cfg = open_clip.get_pretrained_cfg(config.model_name, tag)
            tag_values.add((tuple(tag_cfg.get("mean") or default[0]), tuple(tag_cfg.get("std") or default[1])))
        if len(tag_values) == 1:
            mean, std = tag_values.pop()
    mean = config.mean if config.mean is not None else mean
    std = config.std if config.std is not None else std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _quickgelu_name(model_name: str | None) -> str:
    if model_name and f"{model_name}-quickgelu" in _open_clip().list_models():
        return f"{model_name}-quickgelu"
    return "ViT-B-32-quickgelu"


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------


def _check_weights_path(weights: str | os.PathLike) -> str:
    path = os.fspath(weights)
    if not os.path.exists(path):
        raise WeightsError(f"weight file {path!r} does not exist: pass the path of a local "
                           f"{'/'.join(WEIGHT_SUFFIXES)} file (nothing is downloaded)")
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
        raise WeightsError(f"weights {path!r} is a folder: pass the path of one weight file"
                           + (f", e.g. one of {inside[:5]}" if inside else ""))
    if not path.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"weight file {path!r} has an unsupported format: use {', '.join(WEIGHT_SUFFIXES)}")
    return path


@lru_cache(maxsize=2)
def _releases(quick_gelu: bool) -> tuple[dict[str, str], dict[str, str]]:
    """The weights of open_clip's pretrained registry trained with QuickGELU (``quick_gelu``) or with exact
    GELU: ``(files, repositories)``, each mapping a lower-case name to the tag it comes from.

    Every tag whose entry says ``quick_gelu`` (OpenAI, laion400m quickgelu, yfcc15m / cc12m, DFN,
    MetaCLIP v1, the MetaCLIP 2 ViT-H-14 worldwide release, ...), or for GELU every other tag, gives
    its release file name from ``url`` (``ViT-B-32.pt``, ``b32_400m.pt``) and its Hugging Face
    repository from ``hf_hub`` (``timm/vit_base_patch32_clip_224.openai``, and the name alone). A name
    that tags of both kinds use is left out.
    """
    open_clip = _open_clip()
    found = {True: ({}, {}), False: ({}, {})}
    for model_name, tag in open_clip.list_pretrained():
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        file_names = {_weights_stem(os.path.basename(tag_cfg["url"]).lower())} if tag_cfg.get("url") else set()
        repo_names = set()
        if tag_cfg.get("hf_hub"):
            repo = "/".join(tag_cfg["hf_hub"].strip("/").split("/")[:2]).lower()  # 'org/name[/file]' -> 'org/name'
            repo_names = {repo, repo.rsplit("/", 1)[-1]}
        files, repos = found[bool(tag_cfg.get("quick_gelu"))]
        source = f"open_clip's {model_name!r} / {tag!r} release"
        files.update(dict.fromkeys(file_names, source))
        repos.update(dict.fromkeys(repo_names, source))
    (files, repos), (other_files, other_repos) = found[quick_gelu], found[not quick_gelu]
    return ({name: source for name, source in files.items() if name not in other_files},
            {name: source for name, source in repos.items() if name not in other_repos})


def _weights_stem(file_name: str) -> str:
    """``file_name`` without its weight-file suffix (``b32_400m.pt`` -> ``b32_400m``)."""
    for suffix in WEIGHT_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[:-len(suffix)]
    return file_name


def _release_of(path: str, quick_gelu: bool = True) -> str | None:
    """The registry's QuickGELU (or, ``quick_gelu=False``, exact-GELU) release that ``path`` names, as
    ``"<tag> ('<name>')"``, or ``None``.

    The file name (any weight suffix: a converted copy keeps its name) is compared with release file
    names; the folders with repositories: a folder named like the repository, an 'org/name' pair of
    folders, or a Hugging Face cache folder ``models--org--name``.
    """
    files, repos = _releases(quick_gelu)
    *folders, file_name = [part for part in path.lower().replace("\\", "/").split("/") if part] or [""]
    stem = _weights_stem(file_name)
    if stem in files:
        return f"{files[stem]} ({file_name!r})"
    candidates = [stem]
    for i, folder in enumerate(folders):
        candidates.append(folder[len("models--"):].replace("--", "/", 1) if folder.startswith("models--") else folder)
        if i:
            candidates.append(f"{folders[i - 1]}/{folder}")
    for name in candidates:
        if name in repos:
            return f"{repos[name]} ({name!r})"
    return None


# Later MetaCLIP releases whose names say "metaclip" but which are not the QuickGELU MetaCLIP v1
# recipe: open_clip's registry has them trained with GELU (altogether; MetaCLIP 2 worldwide at 378
# pixels and bigG). The one QuickGELU MetaCLIP 2 release (ViT-H-14 worldwide, 224 pixels) is
# recognised by its registry name before this exemption applies.
_NOT_METACLIP_V1 = ("metaclip2", "metaclip-2", "metaclip 2", "worldwide", "altogether")


def _quickgelu_source(path: str | os.PathLike) -> str | None:
    """What marks ``path`` as QuickGELU-trained weights (see ``is_quickgelu_weights_file``), or ``None``."""
    path = os.fspath(path)
    release = _release_of(path)
    if release:
        return release
    text = path.lower()
    if path.endswith(".safetensors") and os.path.isfile(path):
        text += " " + " ".join(f"{k} {v}" for k, v in _safetensors_metadata(path).items()).lower()
    if "metaclip" in text and not any(marker in text for marker in _NOT_METACLIP_V1):
        return "a MetaCLIP (v1) checkpoint ('metaclip' in the path or safetensors metadata)"
    return None


def is_quickgelu_weights_file(path: str | os.PathLike) -> bool:
    """Whether a weight file holds weights trained with QuickGELU (to load into a QuickGELU tower).

    True when the path names a QuickGELU release of open_clip's pretrained registry (any tag with
    ``quick_gelu``): its release file name (``ViT-B-32.pt``, ``b32_400m.pt``,
    ``vit_b_32-quickgelu-laion400m_e32-46683a32.pt``, with any weight suffix) or its Hugging Face
    repository as a folder (``apple/DFN5B-CLIP-ViT-H-14``, the cache folder
    ``models--timm--vit_base_patch32_clip_224.openai``, or the repository name alone). Also True when
    the path (case-insensitive) or the safetensors metadata (keys or values) mentions ``metaclip``
    (MetaCLIP v1) without naming a later GELU release (``metaclip2`` / ``worldwide``, ``altogether``).
    """
    return _quickgelu_source(path) is not None


def _safetensors_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - any parse failure means the file is unusable
        raise WeightsError(f"weight file {path!r} is not a readable safetensors file: {error}") from error


def load_weights_file(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a weight file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read directly. ``.bin`` / ``.pt`` / ``.pth`` files are read with
    ``torch.load(weights_only=True)``; a file that needs full unpickling (an original OpenAI
    TorchScript archive, a checkpoint holding Python objects) raises ``WeightsError`` unless
    ``allow_unsafe_pickle`` is set. A ``{"state_dict": ...}`` wrapper and DDP ``module.``
    prefixes are removed.
    """
    path = _check_weights_path(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        _safetensors_metadata(path)  # clear error for a file that is not safetensors
        return load_file(path, device="cpu")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - sorted out below
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        if "weights_only" not in str(error) and "weights only" not in str(error).lower():
            raise WeightsError(f"weight file {path!r} cannot be read by torch.load ({reason}): "
                               "is it a complete, uncorrupted PyTorch file?") from error
        if not allow_unsafe_pickle:
            raise WeightsError(
                f"weight file {path!r} cannot be read as plain tensors (torch.load with weights_only=True "
                f"failed: {reason}). Original OpenAI/MetaCLIP .pt releases are TorchScript archives or carry "
                "Python objects, which need full unpickling, and unpickling can run code. If you trust this "
                "file, pass allow_unsafe_pickle=True, or convert it once to .safetensors."
            ) from error
        warnings.warn(f"reading {path!r} with full unpickling (weights_only=False), as allow_unsafe_pickle=True "
                      "asked; convert it to .safetensors to avoid this", stacklevel=3)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes about TorchScript dispatch / deprecation
                checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # noqa: BLE001
            raise WeightsError(f"weight file {path!r} cannot be read: {inner}") from inner

    if isinstance(checkpoint, torch.jit.ScriptModule):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"weight file {path!r} does not hold a state dict of tensors "
                           f"(found {type(checkpoint).__name__})")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint


def _visual_state_dict(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The image-tower part: ``visual.*`` keys of a full CLIP state dict, else the dict as it is."""
    visual = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    if visual:
        return visual
    if any(key.startswith(("vision_model.", "text_model.")) for key in state):
        raise WeightsError(f"weight file {path!r} is a Hugging Face transformers CLIP checkpoint ('vision_model.*' "
                           "keys), not an open_clip one: load the open_clip release of these weights (e.g. "
                           "'open_clip_model.safetensors' or 'open_clip_pytorch_model.bin' of the same repository)")
    if any(key.startswith(("token_embedding.", "text.", "transformer.resblocks.")) for key in state) and \
            not any(key.startswith(("conv1.", "trunk.")) for key in state):
        raise WeightsError(f"weight file {path!r} looks like a text tower only: it has no 'visual.*' keys")
    return state


def _mismatch_report(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     full_shapes: dict[str, tuple], pruned_away: set[str], shown: int = 5) -> str:
    """A short list of missing, unexpected and wrongly shaped keys; empty when the file fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(full_shapes))
    wrong_shape = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {full_shapes[key]}"
        for key in set(state) & set(full_shapes)
        if tuple(state[key].shape) != full_shapes[key] and key not in pruned_away
    )
    lines = []
    for label, keys in (("missing from the file", missing), ("not in the model", unexpected),
                        ("shape mismatch", wrong_shape)):
        if keys:
            more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(keys[:shown])}{more}")
    return "\n".join(lines)
