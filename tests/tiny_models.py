"""The small random models the tests build (imported as `from tests.tiny_models import tiny_fusion_model`)."""
import torch

import fusion
from vision import VisionEncoderConfig


def tiny_fusion_model(tok, seed: int = 0, num_frames: int | None = None, image_position_embedding: bool = False,
                      **decoder) -> fusion.FusionModel:
    """A 2-layer MoE decoder with a 1-layer 32-px vision tower, in eval mode; `decoder` overrides its config."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=64, num_experts=4, attention_chunk_size=16, floor_scale=8, nope_interval=2,
                    initializer_range=0.1)
    settings.update(decoder)
    extra = {} if num_frames is None else {"video": fusion.VideoSettings(num_frames=num_frames)}
    config = fusion.FusionConfig(decoder=fusion.DecoderConfig(**settings), **extra,
                                 image_position_embedding=image_position_embedding,
                                 vision=VisionEncoderConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2))
    return fusion.FusionModel(config, tok).eval()
