"""``FusionTokenizer``: byte-level BPE text ⇄ ids, the Llama 4 control tokens, chat turns.

One ``tokenizer.json`` file (the Hugging Face ``tokenizers`` format, so other tools can
read it too) holds the whole tokenizer: the BPE merges, the lossless byte-level
pre-tokenizer and decoder settings, and the special tokens with their ids.

Plain text is always encoded with special-token matching off: a user who types
``<|eot|>`` gets the ids of those seven characters, never the end-of-turn id. Control
tokens enter a sequence only by id (see ``chat.py`` and ``placeholders.py``). That is a setting
of ``FusionTokenizer`` (kept by its copies and pickles), not of the file: another tool that
reads ``tokenizer.json`` must turn special-token matching off itself (``tokenizers``:
``encode_special_tokens = True``).
"""

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from . import special_tokens as st
from .bpe import BYTE_ALPHABET_SIZE, lone_surrogate_error, train_byte_level_bpe
from .chat import EncodedConversation, encode_conversation, encode_layout
from .errors import InvalidTokenIdError, TokenizerError, TokenizerFileError
from .placeholders import ImagePlaceholder, VideoPlaceholder, integer_scalar

TOKENIZER_FILE_NAME = "tokenizer.json"
# Llama 4's filler tokens (`<|reserved_special_token_0|>` ... `_903|>`, ids 201144-202047 in its tokenizer.json)
_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")


def _tokenizer_file(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a ``.json`` file, else ``path/tokenizer.json`` (a folder)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        return path / TOKENIZER_FILE_NAME
    return path


def _tokenizer_from_json(cls: type, text: str) -> "FusionTokenizer":
    """A pickled tokenizer rebuilt from its ``tokenizer.json`` text."""
    return cls(HFTokenizer.from_str(text), source="a pickled tokenizer")


class FusionTokenizer:
    """A byte-level BPE tokenizer with the Llama 4 special tokens and chat format.

    Make one with :meth:`train` or :meth:`load`. ``len(tokenizer)`` (= ``vocab_size``) is
    the embedding-table size a model needs: the base BPE vocabulary plus the special tokens,
    whose ids come after the base vocabulary.
    """

    def __init__(self, bpe: HFTokenizer, source: str = "the given tokenizer") -> None:
        """Wrap a ``tokenizers.Tokenizer`` that already holds every token of ``SPECIAL_TOKENS``.

        ``source`` names where ``bpe`` came from, for error messages.
        """
        added = bpe.get_added_tokens_decoder()  # {id: AddedToken}
        special_ids = {token.content: token_id for token_id, token in added.items() if token.special}
        missing = [token for token in st.SPECIAL_TOKENS if token not in special_ids]
        if missing:
            llama4 = set(missing) == {st.VIDEO_START, st.VIDEO_END}
            raise TokenizerFileError(
                f"{source} lacks these special tokens (or has them as plain tokens): {', '.join(missing)}; "
                + ("it looks like a Llama 4 tokenizer: load it with FusionTokenizer.from_llama4, which gives the "
                   "video markers two of its reserved tokens" if llama4 else
                   "it was not made by FusionTokenizer.train. Train a tokenizer with FusionTokenizer.train, "
                   "or add the tokens as special tokens")
            )
        # A copy: the setting below would otherwise change the caller's own tokenizer.
        self._bpe = HFTokenizer.from_str(bpe.to_str())
        # All text goes through BPE as text, special-looking strings included. Not saved in
        # tokenizer.json (a plain ``tokenizers.Tokenizer.from_file`` matches special strings), so
        # it is set here on every construction, copies included (``__reduce__``).
        self._bpe.encode_special_tokens = True
        self._special_token_ids = {token: special_ids[token] for token in st.SPECIAL_TOKENS}
        self._vocab_size = bpe.get_vocab_size(with_added_tokens=True)

    def __reduce__(self):
        """Pickled (DataLoader workers, ``copy.deepcopy``) as its ``tokenizer.json`` text, rebuilt through
        ``__init__``: the wrapped tokenizer alone would pickle without its text-only special strings."""
        return _tokenizer_from_json, (type(self), self._bpe.to_str())

    # ----- making, saving, loading -------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "FusionTokenizer":
        """Train on an iterable of texts (read once).

        ``vocab_size`` is the total size, special tokens included: the base BPE vocabulary
        gets ``vocab_size - len(SPECIAL_TOKENS)`` tokens (the 256 bytes and the learned
        merges), or fewer if the corpus runs out of pairs seen ``min_frequency`` times.
        """
        num_special = len(st.SPECIAL_TOKENS)
        smallest = BYTE_ALPHABET_SIZE + num_special
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
            raise TokenizerError(
                f"vocab_size={vocab_size!r} is too small: it must hold the {BYTE_ALPHABET_SIZE} byte tokens "
                f"and the {num_special} special tokens, so use at least {smallest}"
            )
        bpe = train_byte_level_bpe(texts, vocab_size=vocab_size - num_special, min_frequency=min_frequency)
        bpe.add_special_tokens(
            [
                AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
                for token in st.SPECIAL_TOKENS
            ]
        )
        return cls(bpe, source="the trained tokenizer")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json``; ``path`` is a ``.json`` file or a folder (created if needed).

        Returns the path of the file written.
        """
        file = _tokenizer_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(file.name + ".tmp")
        temporary.write_text(self._bpe.to_str(pretty=True), encoding="utf-8")
        os.replace(temporary, file)  # never leave a half-written tokenizer.json behind
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionTokenizer":
        """Load from a ``tokenizer.json`` file, or a folder (e.g. a checkpoint) holding one."""
        file = _tokenizer_file(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {file}; pass a tokenizer.json path or a folder holding one "
                "(FusionTokenizer.save writes it)"
            )
        try:
            bpe = HFTokenizer.from_file(str(file))
        except Exception as error:  # the Rust side raises a bare Exception on bad JSON
            raise TokenizerFileError(f"{file} is not a readable tokenizer.json: {error}") from error
        return cls(bpe, source=str(file))

    @classmethod
    def from_llama4(cls, path: str | os.PathLike) -> "FusionTokenizer":
        """Load the ``tokenizer.json`` of a Hugging Face Llama 4 checkpoint (a file, or the folder holding it).

        Llama 4's tokenizer has every control token fusion uses but the two video markers of its own
        (``<|video_start|>``, ``<|video_end|>``): they take the ids of the last two of its filler tokens
        (``<|reserved_special_token_N|>``), so every id stays within the checkpoint's embedding table and
        all other ids are Llama 4's. A file that already has the markers (one saved by ``save``) loads as
        ``load`` would load it.
        """
        file = _tokenizer_file(path)
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}; a Hugging Face Llama 4 checkpoint folder holds "
                                    f"its tokenizer.json")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            added = data["added_tokens"]
            contents = {token["content"] for token in added}
        except (ValueError, KeyError, TypeError) as error:
            raise TokenizerFileError(f"{file} is not a readable tokenizer.json: {error}") from error
        missing = [token for token in (st.VIDEO_START, st.VIDEO_END) if token not in contents]
        if missing:
            fillers = sorted((token for token in added if token.get("special") and _RESERVED.fullmatch(token["content"])),
                             key=lambda token: token["id"])
            if len(fillers) < len(missing):
                raise TokenizerFileError(f"{file} has no {st.VIDEO_START} / {st.VIDEO_END} and not enough "
                                         f"<|reserved_special_token_N|> tokens to give them; it is not a Llama 4 "
                                         f"tokenizer (FusionTokenizer.load takes fusion's own)")
            vocab = data.get("model", {}).get("vocab")
            for token, filler in zip(missing, fillers[-len(missing):]):
                if isinstance(vocab, dict) and filler["content"] in vocab:
                    vocab[token] = vocab.pop(filler["content"])
                filler["content"] = token
        return cls(HFTokenizer.from_str(json.dumps(data)), source=str(file))

    # ----- sizes and ids -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding-table size)."""
        return self._vocab_size

    @property
    def base_vocab_size(self) -> int:
        """Number of BPE tokens (bytes and merges), special tokens excluded."""
        return self._bpe.get_vocab_size(with_added_tokens=False)

    @property
    def special_token_ids(self) -> Mapping[str, int]:
        """``{special token string: id}`` for every token of ``SPECIAL_TOKENS`` (a copy)."""
        return dict(self._special_token_ids)

    @property
    def bos_id(self) -> int:
        return self._special_token_ids[st.BEGIN_OF_TEXT]

    @property
    def eos_id(self) -> int:
        """``<|end_of_text|>``."""
        return self._special_token_ids[st.END_OF_TEXT]

    @property
    def header_start_id(self) -> int:
        return self._special_token_ids[st.HEADER_START]

    @property
    def header_end_id(self) -> int:
        return self._special_token_ids[st.HEADER_END]

    @property
    def eom_id(self) -> int:
        return self._special_token_ids[st.END_OF_MESSAGE]

    @property
    def eot_id(self) -> int:
        return self._special_token_ids[st.END_OF_TURN]

    @property
    def image_start_id(self) -> int:
        return self._special_token_ids[st.IMAGE_START]

    @property
    def image_end_id(self) -> int:
        return self._special_token_ids[st.IMAGE_END]

    @property
    def image_id(self) -> int:
        """``<|image|>``: starts the global thumbnail (and a 1x1 image's patches)."""
        return self._special_token_ids[st.IMAGE]

    @property
    def patch_id(self) -> int:
        """``<|patch|>``: the positions the fused model fills with patch embeddings."""
        return self._special_token_ids[st.PATCH]

    @property
    def tile_x_separator_id(self) -> int:
        return self._special_token_ids[st.TILE_X_SEPARATOR]

    @property
    def tile_y_separator_id(self) -> int:
        return self._special_token_ids[st.TILE_Y_SEPARATOR]

    @property
    def pad_id(self) -> int:
        """``<|finetune_right_pad|>``."""
        return self._special_token_ids[st.PAD]

    @property
    def video_start_id(self) -> int:
        return self._special_token_ids[st.VIDEO_START]

    @property
    def video_end_id(self) -> int:
        return self._special_token_ids[st.VIDEO_END]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eot, eom, end_of_text."""
        return [self._special_token_ids[token] for token in st.STOP_TOKENS]

    # ----- text ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of plain ``text``: no begin-of-text, and special-token strings stay text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        try:
            return self._bpe.encode(text, add_special_tokens=False).ids
        except TypeError:  # what `tokenizers` raises for a str it cannot pass as UTF-8
            error = lone_surrogate_error(text, "the text")
            if error is None:
                raise
            raise error from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor); control tokens dropped unless asked.

        An id may be any integer scalar: a Python ``int``, a numpy integer, or a 0-d integer
        tensor (e.g. an element of ``list(tensor)``); ``bool`` is not an id.

        Raises :class:`InvalidTokenIdError` for an id that is not an integer, or is outside
        ``[0, len(self))``, e.g. a ``-100`` label: decode ``input_ids``, or filter labels first.
        """
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        ids = list(ids)
        checked = []
        for position, token_id in enumerate(ids):
            value = integer_scalar(token_id)
            if value is None:
                raise InvalidTokenIdError(
                    f"decode: ids[{position}]={token_id!r} is not an integer ({type(token_id).__name__}); "
                    "pass a flat sequence of integer ids (ints, numpy integers or 0-d integer tensors)"
                )
            if not 0 <= value < self._vocab_size:
                raise InvalidTokenIdError(
                    f"decode: ids[{position}]={token_id!r} is out of range: token ids are in [0, {self._vocab_size}); "
                    "pass a flat sequence of ids (labels of -100 must be removed first)"
                )
            checked.append(value)
        return self._bpe.decode(checked, skip_special_tokens=skip_special_tokens)

    # ----- media and conversations ----------------------------------------------------------

    def encode_image(self, image: ImagePlaceholder) -> list[int]:
        """Ids of one image block (Llama 4 layout); holds ``image.num_patch_tokens`` patch ids."""
        return encode_layout(self, image.layout())

    def encode_video(self, video: VideoPlaceholder) -> list[int]:
        """Ids of one video block: per frame, its timestamp text and a 1x1 image block."""
        return encode_layout(self, video.layout())

    def encode_conversation(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Sequence[ImagePlaceholder] = (),
        videos: Sequence[VideoPlaceholder] = (),
        sample_id: object = None,
        add_generation_prompt: bool = False,
    ) -> EncodedConversation:
        """Render a chat in the Llama 4 format, with labels; see :func:`tokenizer.chat.encode_conversation`."""
        return encode_conversation(
            self,
            messages,
            images=images,
            videos=videos,
            sample_id=sample_id,
            add_generation_prompt=add_generation_prompt,
        )

    def __repr__(self) -> str:
        return f"FusionTokenizer(vocab_size={self._vocab_size}, base_vocab_size={self.base_vocab_size})"
