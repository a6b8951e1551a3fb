"""Training a byte-level BPE model with the Hugging Face ``tokenizers`` library.

The pipeline is lossless by construction:

* no normaliser (text is never changed before splitting),
* a pre-tokenizer that splits text with the Llama 4 (o200k-style) pattern, keeping every
  character (``behavior="isolated"``: text the pattern does not match stays as its own
  piece), then maps each UTF-8 byte to one printable character (byte-level, no prefix
  space),
* all 256 bytes in the initial alphabet, so every input byte has a token and there is no
  unknown token,
* a byte-level decoder that maps the characters back to bytes.

This module knows nothing about special tokens or chat turns; see ``fusion_tokenizer``.
"""

from collections.abc import Iterable, Iterator

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import TokenizerError

# The Llama 4 split pattern (llama4-reference.md §6): words with an optional leading
# non-letter, contractions, numbers of at most 3 digits, punctuation runs, newlines,
# whitespace.
LLAMA4_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

BYTE_ALPHABET_SIZE = 256


def untrained_byte_level_bpe() -> HFTokenizer:
    """An empty BPE model wired with the lossless byte-level pre-tokenizer and decoder."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA4_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    return bpe


def lone_surrogate_error(text: str, what: str) -> TokenizerError | None:
    """The error for ``text`` (named ``what``) holding a lone surrogate, which no UTF-8 holds, else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return TokenizerError(
            f"{what} holds a lone surrogate {text[error.start]!r} at character {error.start} (e.g. half of an "
            "emoji cut in two, or a \\ud83d escape in JSON): it is not text; repair or drop it"
        )
    return None


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    """Yield ``texts`` unchanged, failing clearly on the first item that is not a ``str``."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(
                f"training text #{index} is a {type(text).__name__}, not a str; "
                "pass an iterable of strings (decode bytes first)"
            )
        error = lone_surrogate_error(text, f"training text #{index}")
        if error is not None:
            raise error
        yield text


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE model on ``texts``.

    Args:
        texts: any iterable of strings (a list, a generator over a file, ...); read once.
        vocab_size: the size of the base vocabulary: the 256 byte tokens plus the learned
            merges. At least 256. The result can be smaller when the corpus runs out of
            pairs that occur ``min_frequency`` times.
        min_frequency: a pair must occur at least this often to be merged.

    Returns:
        A ``tokenizers.Tokenizer`` with no special tokens yet.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < BYTE_ALPHABET_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is too small: a byte-level vocabulary needs at least "
            f"{BYTE_ALPHABET_SIZE} tokens (one per byte); pick {BYTE_ALPHABET_SIZE} or more"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerError(f"min_frequency={min_frequency!r} must be an int >= 1")
    if isinstance(texts, str):
        raise TokenizerError(
            "texts is a single str; pass an iterable of strings, e.g. [text] or a list of lines"
        )
    bpe = untrained_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_checked_texts(texts), trainer=trainer)
    return bpe
