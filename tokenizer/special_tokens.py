"""The Llama 4 control tokens this project uses, and their fixed order.

Only the tokens the models here need are defined: the Llama 4 basics (text, headers,
turn ends, pad), its image layout tokens, and two video markers of our own. The ~2000
reserved filler tokens of Llama 4 are left out because the models here are tiny.

The order of :data:`SPECIAL_TOKENS` is the order in which the tokens are appended after
the base BPE vocabulary at training time, so a freshly trained tokenizer with a base
vocabulary of ``B`` tokens gives ``SPECIAL_TOKENS[i]`` the id ``B + i``. After loading,
ids are always looked up by string from ``tokenizer.json``, never assumed.
"""

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
END_OF_MESSAGE = "<|eom|>"
END_OF_TURN = "<|eot|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
IMAGE = "<|image|>"
PATCH = "<|patch|>"
TILE_X_SEPARATOR = "<|tile_x_separator|>"
TILE_Y_SEPARATOR = "<|tile_y_separator|>"
PAD = "<|finetune_right_pad|>"
# Not in Llama 4: our own markers around a video's frames.
VIDEO_START = "<|video_start|>"
VIDEO_END = "<|video_end|>"

SPECIAL_TOKENS: tuple[str, ...] = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    HEADER_START,
    HEADER_END,
    END_OF_MESSAGE,
    END_OF_TURN,
    IMAGE_START,
    IMAGE_END,
    IMAGE,
    PATCH,
    TILE_X_SEPARATOR,
    TILE_Y_SEPARATOR,
    PAD,
    VIDEO_START,
    VIDEO_END,
)

# Tokens that end generation (Llama 4: eos, eom, eot).
STOP_TOKENS: tuple[str, ...] = (END_OF_TURN, END_OF_MESSAGE, END_OF_TEXT)
