"""Text ⇄ ids for fusion models: byte-level BPE, Llama 4 special tokens, chat template, labels.

A bottom layer: imports no other project package.

    from tokenizer import FusionTokenizer, ImagePlaceholder
    tok = FusionTokenizer.train(texts, vocab_size=512)
    tok.save("checkpoint/")                      # writes checkpoint/tokenizer.json
    tok = FusionTokenizer.load("checkpoint/")
    sample = tok.encode_conversation(
        [{"role": "user", "content": "<image>\\nWhat is this?"}, {"role": "assistant", "content": "A cat."}],
        images=[ImagePlaceholder(tokens_per_tile=144, grid=(2, 2))],
    )
    sample.input_ids, sample.labels
"""

from .chat import (IGNORE_INDEX, IMAGE_MARKER, ROLES, VIDEO_MARKER, EncodedConversation, content_text,
                   count_media_markers, escape_markers, media_part_paths, text_without_markers)
from .errors import (
    ConversationFormatError,
    InvalidTokenIdError,
    MediaCountMismatchError,
    NoSupervisedTokensError,
    PlaceholderError,
    TokenizerError,
    TokenizerFileError,
)
from .fusion_tokenizer import TOKENIZER_FILE_NAME, FusionTokenizer
from .placeholders import ImagePlaceholder, VideoPlaceholder, format_timestamp
from .special_tokens import SPECIAL_TOKENS, STOP_TOKENS

# The same class under the short name some callers use.
Tokenizer = FusionTokenizer

__all__ = [
    "FusionTokenizer",
    "Tokenizer",
    "EncodedConversation",
    "ImagePlaceholder",
    "VideoPlaceholder",
    "format_timestamp",
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "VIDEO_MARKER",
    "content_text",
    "count_media_markers",
    "escape_markers",
    "media_part_paths",
    "text_without_markers",
    "ROLES",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "TOKENIZER_FILE_NAME",
    "TokenizerError",
    "TokenizerFileError",
    "InvalidTokenIdError",
    "PlaceholderError",
    "ConversationFormatError",
    "MediaCountMismatchError",
    "NoSupervisedTokensError",
]
