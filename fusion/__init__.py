"""fusion: Llama-4-style early-fusion multimodal models in plain PyTorch."""
from .decoder import Decoder, DecoderOutput, attach_load_balancing
from .decoder_config import DecoderConfig, RopeScaling
from .generation import generate

__all__ = ["Decoder", "DecoderConfig", "DecoderOutput", "RopeScaling", "attach_load_balancing", "generate"]
__version__ = "0.1.0"
