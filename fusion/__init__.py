"""fusion: Llama-4-style early-fusion multimodal models in plain PyTorch.

    import fusion
    vqa = fusion.pipeline("vqa")                       # the default model that ships with the package
    vqa(image="cat.png", question="what color is the shape?")

    model = fusion.FusionModel.from_pretrained("runs/shapes/final")
    decoder = fusion.Decoder.from_hf("/path/to/Llama-4-Scout")   # text weights of a Hugging Face checkpoint
"""
from . import errors
from .decoder import Decoder, DecoderOutput, attach_load_balancing
from .decoder_config import DecoderConfig, RopeScaling
from .fusion_config import FusionConfig
from .generation import generate
from .model import FusionModel, FusionOutput
from .processor import FusionProcessor, VideoSettings

__all__ = ["Decoder", "DecoderConfig", "DecoderOutput", "RopeScaling", "FusionConfig", "FusionModel", "FusionOutput",
           "FusionProcessor", "VideoSettings", "attach_load_balancing", "errors", "generate", "pipeline"]
__version__ = "0.1.0"


def pipeline(task: str, model=None, device=None, dtype=None, batch_size: int = 1, **kwargs):
    """A task pipeline ("captioning", "vqa", "video-qa"), as `transformers.pipeline`. See `pipelines.pipeline`."""
    from pipelines import pipeline as make_pipeline  # lazy: pipelines/ sits above fusion/

    return make_pipeline(task, model=model, device=device, dtype=dtype, batch_size=batch_size, **kwargs)
