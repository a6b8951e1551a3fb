"""`FusionConfig`: the whole multimodal model (decoder, vision tower, adapter, preprocessing) as one
JSON-serialisable dataclass, with the format version that keeps old checkpoints loading."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vision.adapter import POSITION_EMBEDDINGS
from vision.checks import is_whole_number
from vision.encoder import VisionEncoderConfig

from .decoder_config import DecoderConfig
from .errors import CheckpointError, ConfigError
from .processor import VideoSettings

FORMAT_VERSION = 1


@dataclass
class FusionConfig:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    adapter_hidden_size: int | None = None  # width of the adapter MLP; None = the decoder's width
    pixel_shuffle_ratio: float = 0.5
    # A learned embedding of each image token's place added to the adapter's output (not in Llama 4, whose
    # encoder carries position with 2-D RoPE): lets a small model say where a thing is (see VisionAdapter).
    # False: none; "per_token" (or True): one vector per token position; "rows_cols": a row plus a column vector.
    image_position_embedding: bool | str = False
    max_tiles: int = 1  # Llama 4 tiling up to this many tiles (+ a global thumbnail); 1 = resize and pad
    pad_with_mean: bool = True  # pad images with the mean colour (normalises to 0); False = black, as Llama 4
    video: VideoSettings = field(default_factory=VideoSettings)

    def __post_init__(self):
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig.from_dict(self.decoder)
        if isinstance(self.vision, dict):
            self.vision = VisionEncoderConfig.from_dict(self.vision)
        if isinstance(self.video, dict):
            self.video = VideoSettings(**self.video)
        hidden = self.adapter_hidden_size
        if hidden is not None and not (is_whole_number(hidden) and hidden >= 1):
            raise ConfigError(f"FusionConfig: adapter_hidden_size must be a whole number >= 1, or None for the "
                              f"decoder's width, got {hidden!r}")
        if not isinstance(self.pad_with_mean, bool):
            raise ConfigError(f"FusionConfig: pad_with_mean must be true or false, got {self.pad_with_mean!r}")
        if self.image_position_embedding is True:
            self.image_position_embedding = "per_token"
        if self.image_position_embedding not in (False, *POSITION_EMBEDDINGS):
            raise ConfigError(f"FusionConfig: image_position_embedding must be false or one of "
                              f"{list(POSITION_EMBEDDINGS)}, got {self.image_position_embedding!r}")

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "decoder": self.decoder.to_dict(), "vision": self.vision.to_dict(),
                "adapter_hidden_size": self.adapter_hidden_size, "pixel_shuffle_ratio": self.pixel_shuffle_ratio,
                "image_position_embedding": self.image_position_embedding,
                "max_tiles": self.max_tiles, "pad_with_mean": self.pad_with_mean,
                "video": dataclasses.asdict(self.video)}

    @classmethod
    def from_dict(cls, d: dict) -> "FusionConfig":
        d = upgrade_config(dict(d))
        d.pop("format_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"FusionConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# Each entry upgrades a config dict from version v to v + 1. When the format changes, bump
# FORMAT_VERSION and add the step here: old folders keep loading.
_UPGRADES: dict[int, callable] = {}


def upgrade_config(d: dict) -> dict:
    version = d.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"config format_version {version!r} is not valid")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"this checkpoint has format version {version}, but this fusion reads up to "
                              f"{FORMAT_VERSION}; upgrade fusion to load it")
    while version < FORMAT_VERSION:
        d = _UPGRADES[version](d)
        version += 1
        d["format_version"] = version
    return d
