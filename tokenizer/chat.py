r"""The Llama 4 chat format, with media placeholders, as token ids and training labels.

Rendered layout (``{...}`` is the turn's content)::

    <|begin_of_text|>
    <|header_start|>system<|header_end|>\n\n{system}<|eot|>        (optional, first only)
    <|header_start|>user<|header_end|>\n\n{user}<|eot|>
    <|header_start|>assistant<|header_end|>\n\n{assistant}<|eot|>
    ...                                                             (any number of turns)
    <|header_start|>assistant<|header_end|>\n\n                    (add_generation_prompt)

The sequence is built piece by piece: text pieces are encoded with special-token matching
off (a typed ``<|eot|>`` stays text), control tokens are inserted by id. Each piece carries
its own "supervised" flag, so labels come from the positions of the rendered pieces and
can never drift from the ids.

Labels (same length as ``input_ids``, not shifted: the model shifts them) are the token
id at the tokens of assistant content and at the ``<|eot|>`` ending each assistant turn,
and :data:`IGNORE_INDEX` (-100) everywhere else (begin-of-text, headers, roles, system
and user turns, and every image/video block, even one inside an assistant turn).

An empty assistant turn still supervises its ``<|eot|>``. But a training sample whose
assistant turns hold no content at all (no assistant turn, or only empty or whitespace-only
ones, e.g. ``" "`` or ``"\n"``) raises :class:`NoSupervisedTokensError`: an eot-only (or
whitespace-only) target is almost always broken data.

Where the media go: a turn's content is either

* a str (the dataset format): every ``<image>`` and ``<video>`` in it is a media marker, never
  text, and marks where the next image / video goes, in order. To put the literal text
  ``<image>`` in a message, escape it with a backslash: ``\<image>`` renders as the text
  ``<image>`` (and ``\<video>`` as ``<video>``). Backslashes right before a marker pair up:
  ``\\<image>`` is one ``\`` of text then a media marker. Backslashes anywhere else are plain
  text; or
* a list of typed parts, as in the chat format of Hugging Face processors and OpenAI-style
  APIs: ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``. The media go where
  the ``{"type": "image"}`` / ``{"type": "video"}`` parts are, and text parts are always
  literal text: a ``<image>`` inside one stays text (no escaping needed). :func:`content_text`
  turns such a list into the equivalent str (markers for media parts, text escaped).

If the conversation has no media marker (or media part) of either kind, all images and then
all videos go at the start of the first user turn. Otherwise the number of markers of each
kind must equal the number of images / videos passed.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import special_tokens as st
from .errors import ConversationFormatError, MediaCountMismatchError, NoSupervisedTokensError, PlaceholderError
from .placeholders import ImagePlaceholder, LayoutPiece, VideoPlaceholder

if TYPE_CHECKING:
    from .fusion_tokenizer import FusionTokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_KINDS = {IMAGE_MARKER: "image", VIDEO_MARKER: "video"}
# A media marker with the run of backslashes right before it (an odd run escapes it).
_MARKER = re.compile(rf"(\\*)({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
_TRAILING_BACKSLASHES = re.compile(r"\\+\Z")


@dataclass
class EncodedConversation:
    """Token ids of a rendered conversation, with training labels.

    ``labels`` is ``None`` for a generation prompt (``add_generation_prompt=True``).
    """

    input_ids: list[int]
    labels: list[int] | None
    sample_id: object = None
    media_order: list[str] = field(default_factory=list)  # "image" / "video", in the order they appear

    @property
    def num_supervised_tokens(self) -> int:
        return 0 if self.labels is None else sum(label != IGNORE_INDEX for label in self.labels)


def _name_sample(sample_id: object) -> str:
    return "sample (no sample_id given)" if sample_id is None else f"sample {sample_id!r}"


PART_MARKERS = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}


def _escape_text(text: str, before_marker: bool) -> str:
    """``text`` written so that :func:`_split_content` reads it back as this very text, all literal.

    Before each ``<image>`` / ``<video>``, the backslashes already there are doubled and one more
    escapes the marker; trailing backslashes are doubled when a media marker follows
    (``before_marker``), so they stay text.
    """
    text = _MARKER.sub(lambda match: match[1] * 2 + "\\" + match[2], text)
    if before_marker:
        text = _TRAILING_BACKSLASHES.sub(lambda match: match[0] * 2, text)
    return text


def content_text(content: object, where: str) -> str:
    r"""A turn's content as a str in the marker format (see the module docstring).

    A str is returned as it is: its ``<image>`` / ``<video>`` are media markers (``\<image>`` is
    the literal text). A list of parts ``{"type": "text", "text": ...}``, ``{"type": "image"}``,
    ``{"type": "video"}`` is joined, each image or video part as its marker (the media themselves
    are passed separately, in order) and each text part as literal text: a ``<image>`` typed in a
    text part is escaped (``\<image>``), so it stays text when the str is encoded. Encoding the
    returned str gives the same ids as encoding the list of parts.

    ConversationFormatError naming ``where`` for any other content.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        pieces: list[str] = []
        text = ""  # the text parts since the last media part, joined before escaping
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text += part["text"]
            elif kind in PART_MARKERS:
                pieces += [_escape_text(text, before_marker=True), PART_MARKERS[kind]]
                text = ""
            else:
                raise ConversationFormatError(
                    f"{where} part {index} must be {{'type': 'text', 'text': str}}, {{'type': 'image'}} "
                    f"or {{'type': 'video'}}, got {part!r}"
                )
        pieces.append(_escape_text(text, before_marker=False))
        return "".join(pieces)
    raise ConversationFormatError(
        f"{where} must be a str or a list of parts ({{'type': 'text', 'text': ...}}, "
        f"{{'type': 'image'}}, {{'type': 'video'}}), got {type(content).__name__}"
    )


MEDIA_PART_PATH_KEYS = ("path", "url")  # besides the part's own kind: {"type": "image", "image": "a.png"}


def _carried(part: Mapping, kind: str) -> dict:
    """What an image / video part carries: ``{key: value}`` of its ``kind`` key and the path keys given."""
    return {key: part[key] for key in (kind, *MEDIA_PART_PATH_KEYS) if part.get(key) is not None}


def media_part_paths(content: object, where: str) -> list[tuple[str, "str | None"]]:
    """``(kind, path)`` of each image / video part of a list of typed parts, in order; ``path`` is None
    for a part that names no file.

    Hugging Face-style parts may carry their file: ``{"type": "image", "image": "img/a.png"}`` (or
    under ``"path"`` / ``"url"``; the same for ``"video"``). :func:`content_text` places such a part's
    marker only; whoever reads the file list (e.g. a dataset record with no ``images`` list) takes the
    paths from here. A str content has no parts: ``[]``.

    ConversationFormatError naming ``where`` for a path that is not a non-empty str, or a part that
    names two different files.
    """
    if isinstance(content, str) or not isinstance(content, Sequence) or isinstance(content, bytes):
        return []
    found: list[tuple[str, str | None]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in PART_MARKERS:
            continue
        given = _carried(part, kind)
        for key, value in given.items():
            if not isinstance(value, str) or not value.strip():
                raise ConversationFormatError(
                    f"{where} part {index}: {key!r} must be the path of the {kind} file, got {value!r}"
                )
        if len(set(given.values())) > 1:
            raise ConversationFormatError(f"{where} part {index} names more than one {kind} file: {given!r}")
        found.append((kind, next(iter(given.values()), None)))
    return found


def media_in_parts(messages: object) -> tuple[list, list]:
    """The images and the videos that the messages' typed parts carry (``{"type": "image", "image": x}``,
    or under ``"path"`` / ``"url"``), in order: any value (a path, a PIL image, an array), None for a part
    that carries none. For callers given no separate media lists (``model.chat``, the processor)."""
    found: dict[str, list] = {"image": [], "video": []}
    for message in messages if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in PART_MARKERS:
                found[kind].append(next(iter(_carried(part, kind).values()), None))
    return found["image"], found["video"]


def _check_messages(messages: object, sample_id: object, add_generation_prompt: bool) -> list[tuple[str, str]]:
    """Validate the message list; return it as ``(role, content)`` pairs."""
    sample = _name_sample(sample_id)
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ConversationFormatError(
            f"{sample}: messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ConversationFormatError(f"{sample}: messages is empty; give at least one user turn")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ConversationFormatError(
                f"{sample}: messages[{index}] must be a dict with 'role' and 'content' keys, got {message!r}"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationFormatError(
                f"{sample}: messages[{index}] has unknown role {role!r}; use one of {', '.join(ROLES)} "
                "(map LLaVA's 'human'/'gpt' to 'user'/'assistant' first)"
            )
        content = content_text(content, f"{sample}: messages[{index}] ({role}) content")
        if role == "system" and index != 0:
            raise ConversationFormatError(
                f"{sample}: messages[{index}] is a system turn; a system turn may only come first"
            )
        turns.append((role, content))
    if add_generation_prompt and turns[-1][0] != "user":
        raise ConversationFormatError(
            f"{sample}: add_generation_prompt=True needs the last turn to be a user turn, "
            f"but it is {turns[-1][0]!r}; drop the trailing turn or set add_generation_prompt=False"
        )
    return turns


def _check_media(items: object, kind: type, argument: str, sample_id: object) -> list:
    if isinstance(items, kind) or not isinstance(items, Sequence):
        raise PlaceholderError(
            f"{_name_sample(sample_id)}: {argument} must be a list of {kind.__name__}, got {type(items).__name__}"
        )
    for index, item in enumerate(items):
        if not isinstance(item, kind):
            raise PlaceholderError(
                f"{_name_sample(sample_id)}: {argument}[{index}] is a {type(item).__name__}, expected {kind.__name__}"
            )
    return list(items)


def _split_content(content: str) -> list[tuple[str, str]]:
    """``content`` as ``(kind, text)`` parts in order: ``("text", literal text)`` with escapes
    resolved, and ``("image", "<image>")`` / ``("video", "<video>")`` for each media marker."""
    parts: list[tuple[str, str]] = []
    text: list[str] = []
    position = 0
    for match in _MARKER.finditer(content):
        backslashes, marker = match[1], match[2]
        text += [content[position : match.start()], "\\" * (len(backslashes) // 2)]
        if len(backslashes) % 2:  # escaped: the marker is text
            text.append(marker)
        else:
            parts += [("text", "".join(text)), (_MARKER_KINDS[marker], marker)]
            text = []
        position = match.end()
    text.append(content[position:])
    parts.append(("text", "".join(text)))
    return [part for part in parts if part[1]]


def escape_markers(text: str) -> str:
    """``text`` written so that, as str content, it is all literal text: each ``<image>`` / ``<video>``
    becomes ``\\<image>`` / ``\\<video>`` (backslashes before them doubled), e.g. a user's question put
    into a prompt template after the template's own marker."""
    return _escape_text(text, before_marker=False)


def text_without_markers(content: str) -> str:
    """The text of the str ``content`` with its media markers left out (escaped ones, ``\\<image>``, are
    the text they stand for)."""
    return "".join(text for kind, text in _split_content(content) if kind == "text")


def count_media_markers(content: str) -> dict[str, int]:
    """How many images and videos the str ``content`` places: ``{"image": n, "video": m}`` (escaped
    markers, ``\\<image>``, are text and do not count)."""
    kinds = [kind for kind, _text in _split_content(content)]
    return {"image": kinds.count("image"), "video": kinds.count("video")}


def _split_markers(turns: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Each turn's content split into text parts and media parts, in order (see :func:`_split_content`)."""
    return [_split_content(content) for _role, content in turns]


def _place_unmarked_media(
    turns: list[tuple[str, str]],
    parts: list[list[tuple[str, str]]],
    num_images: int,
    num_videos: int,
    sample_id: object,
) -> None:
    """With no marker anywhere, put all images then all videos at the start of the first user turn."""
    if num_images == 0 and num_videos == 0:
        return
    first_user = next((index for index, (role, _) in enumerate(turns) if role == "user"), None)
    if first_user is None:
        raise ConversationFormatError(
            f"{_name_sample(sample_id)}: {num_images} image(s) and {num_videos} video(s) were given with no "
            f"{IMAGE_MARKER}/{VIDEO_MARKER} marker and there is no user turn to put them in; "
            "add a user turn or markers"
        )
    parts[first_user][:0] = [("image", IMAGE_MARKER)] * num_images + [("video", VIDEO_MARKER)] * num_videos


def _check_marker_counts(
    parts: list[list[tuple[str, str]]], num_images: int, num_videos: int, sample_id: object
) -> None:
    found = {noun: sum(kind == noun for turn in parts for kind, _text in turn) for noun in ("image", "video")}
    for marker, given, noun in ((IMAGE_MARKER, num_images, "image"), (VIDEO_MARKER, num_videos, "video")):
        if found[noun] != given:
            # all the markers are there, of the wrong kind: a video marked <image> (or the other way round)
            swapped = (f" ({VIDEO_MARKER} marks a video, {IMAGE_MARKER} an image: is one written for the other?)"
                       if sum(found.values()) == num_images + num_videos else "")
            raise MediaCountMismatchError(
                f"{_name_sample(sample_id)}: the messages contain {found[noun]} {marker} marker(s) but {given} "
                f"{noun}(s) were given{swapped}; put one {marker} in the text (or one {{'type': '{noun}'}} part) "
                f"per {noun}, in order (or no marker of any kind to place all media at the start of the first "
                f"user turn); in str content, write \\{marker} for the literal text {marker}"
            )


class _SequenceBuilder:
    """Appends pieces of ids and keeps the label of every position in step with them."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []

    def add(self, ids: list[int], supervised: bool) -> None:
        self.ids += ids
        self.labels += ids if supervised else [IGNORE_INDEX] * len(ids)


def encode_layout(tokenizer: "FusionTokenizer", pieces: list[LayoutPiece]) -> list[int]:
    """Ids of a media layout: control tokens by id, text pieces encoded as plain text."""
    ids: list[int] = []
    for piece in pieces:
        if piece.is_special:
            ids.append(tokenizer.special_token_ids[piece.text])
        else:
            ids += tokenizer.encode(piece.text)
    return ids


def encode_conversation(
    tokenizer: "FusionTokenizer",
    messages: Sequence[Mapping[str, str]],
    images: Sequence[ImagePlaceholder] = (),
    videos: Sequence[VideoPlaceholder] = (),
    sample_id: object = None,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    r"""Render ``messages`` in the Llama 4 chat format with images and videos expanded.

    Args:
        tokenizer: the :class:`FusionTokenizer` giving text and control-token ids.
        messages: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``; a
            system turn may only come first. ``content`` is a str, in which every ``<image>`` /
            ``<video>`` is a media marker (write ``\<image>`` for the literal text), or a list
            of typed parts, whose text parts are literal text and whose ``{"type": "image"}`` /
            ``{"type": "video"}`` parts place the media (see the module docstring).
        images / videos: one placeholder per ``<image>`` / ``<video>`` marker (or media part), in order.
        sample_id: names the sample in error messages (e.g. the dataset row id).
        add_generation_prompt: render an inference prompt: the last turn must be a user
            turn, the ids end with the assistant header, and ``labels`` is ``None``.

    Raises:
        ConversationFormatError: bad message shape, unknown role, misplaced system turn.
        MediaCountMismatchError: marker count differs from the images / videos given.
        NoSupervisedTokensError: a training sample with no assistant content token.
    """
    turns = _check_messages(messages, sample_id, add_generation_prompt)
    images = _check_media(images, ImagePlaceholder, "images", sample_id)
    videos = _check_media(videos, VideoPlaceholder, "videos", sample_id)

    parts = _split_markers(turns)
    has_markers = any(kind != "text" for turn in parts for kind, _text in turn)
    if not has_markers:
        _place_unmarked_media(turns, parts, len(images), len(videos), sample_id)
    _check_marker_counts(parts, len(images), len(videos), sample_id)

    ids_of = tokenizer.special_token_ids
    builder = _SequenceBuilder()
    next_image, next_video = iter(images), iter(videos)
    num_content_tokens = 0
    media_order: list[str] = []

    def add_header(role: str) -> None:
        builder.add([ids_of[st.HEADER_START]], supervised=False)
        builder.add(tokenizer.encode(role), supervised=False)
        builder.add([ids_of[st.HEADER_END]], supervised=False)
        builder.add(tokenizer.encode("\n\n"), supervised=False)

    builder.add([tokenizer.bos_id], supervised=False)
    for (role, _content), turn_parts in zip(turns, parts):
        is_assistant = role == "assistant"
        add_header(role)
        for kind, part in turn_parts:
            if kind == "image":
                builder.add(encode_layout(tokenizer, next(next_image).layout()), supervised=False)
                media_order.append("image")
            elif kind == "video":
                builder.add(encode_layout(tokenizer, next(next_video).layout()), supervised=False)
                media_order.append("video")
            else:
                text_ids = tokenizer.encode(part)
                builder.add(text_ids, supervised=is_assistant)
                num_content_tokens += len(text_ids) if is_assistant and part.strip() else 0
        builder.add([tokenizer.eot_id], supervised=is_assistant)

    if add_generation_prompt:
        add_header("assistant")
        return EncodedConversation(input_ids=builder.ids, labels=None, sample_id=sample_id, media_order=media_order)

    if num_content_tokens == 0:
        num_assistant = sum(role == "assistant" for role, _ in turns)
        reason = ("no assistant turn" if num_assistant == 0
                  else f"{num_assistant} assistant turn(s), all empty or whitespace only")
        raise NoSupervisedTokensError(
            f"{_name_sample(sample_id)} has nothing to learn from ({reason}); every label would be "
            f"{IGNORE_INDEX} apart from end-of-turn tokens. Fix or drop the sample, or pass "
            "add_generation_prompt=True if it is an inference prompt"
        )
    return EncodedConversation(input_ids=builder.ids, labels=builder.labels, sample_id=sample_id,
                               media_order=media_order)
