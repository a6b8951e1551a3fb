"""Images and video in, patch tokens out: loading and tiling, the open_clip encoder tower, the pixel
shuffle adapter, and frame sampling. A bottom layer: imports no other project package."""
from .adapter import VisionAdapter, pixel_shuffle, pixel_shuffle_tokens
from .encoder import VisionEncoder, VisionEncoderConfig
from .errors import ImageLoadError, ImageTooLargeError, VideoLoadError, VisionInputError, WeightsError
from .image import DEFAULT_MAX_PIXELS, ImageProcessor, load_image
from .tiling import find_best_canvas, tile_image
from .video import SampledFrames, frame_indices, frame_indices_at_times, sample_frames
from .video_io import write_video

__all__ = ["VisionAdapter", "pixel_shuffle", "pixel_shuffle_tokens", "VisionEncoder", "VisionEncoderConfig",
           "ImageLoadError", "ImageTooLargeError", "VideoLoadError", "VisionInputError", "WeightsError",
           "DEFAULT_MAX_PIXELS", "ImageProcessor", "load_image", "find_best_canvas", "tile_image", "SampledFrames",
           "frame_indices", "frame_indices_at_times", "sample_frames", "write_video"]
