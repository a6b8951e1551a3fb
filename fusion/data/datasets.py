"""Conversation datasets from JSONL or LLaVA-style JSON files, for training and evaluation.

Two file layouts, told apart by their content (a JSON list starts with ``[``; anything else is read
as JSON Lines), whatever the extension:

JSON Lines, one sample per line (the shapes world writes these)::

    {"id": "s1", "images": ["img/1.png"], "videos": [],
     "conversations": [{"role": "user", "content": "<image>\\nWhat color is it?"},
                       {"role": "assistant", "content": "red"}],
     "type": "color", "task": "vqa"}

LLaVA JSON, one list of samples::

    [{"id": "s1", "image": "img/1.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat color is it?"},
                        {"from": "gpt", "value": "red"}]}]

Either record style is accepted in either layout: ``images``/``image`` and ``videos``/``video`` may be
one path or a list (a record giving both ``images`` and ``image``, or both ``videos`` and ``video``, is
refused: "conflicting media"); turns may be ``{"role", "content"}`` or ``{"from", "value"}`` (``human`` and
``gpt`` map to ``user`` and ``assistant``; a number as content is read as its text). A content may also be a
list of typed parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``); Hugging Face-style parts that
name their file, ``{"type": "image", "image": "img/1.png"}`` (or under ``"path"``/``"url"``; the same for
videos), give the record's images in order when it has no ``images`` list (both is refused). Assistant
turns before the first user turn (a LLaVA conversation opening with ``gpt``) are dropped, as LLaVA's own
preprocessing does. ``type`` and ``task`` are optional. Media paths are relative to ``root`` (default: the
folder of the file); absolute paths are kept. A sample without images or videos is a text-only sample.
JSON Lines end at ``\n`` only (a JSON string may hold U+2028 and the like unescaped).

Bad data does not stop a run. A malformed line or a record with a missing field is counted at load
time (with its line number) and left out; a sample whose image or video cannot be read, whose
markers do not match its media, or that has nothing to supervise (no answer, or only whitespace)
makes ``dataset[i]`` return ``None``. Each bad sample is counted per reason (``dataset.bad_counts``) and a ``DatasetWarning``
names the sample, the file and the reason. ``strict=True`` raises ``DatasetError`` instead. A file
that is mostly bad is a wrong file or a wrong ``root``: once ``min_attempts`` records were tried and
more than ``max_bad_fraction`` of them were bad (records: a grouped sample counts each of its questions), ``dataset[i]`` raises ``DatasetError`` with the
counts and the most common reasons (at load time too, when most records are malformed).

Use with a plain ``DataLoader``::

    dataset = ConversationDataset("train.jsonl", model.processor)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=2, collate_fn=dataset.collate_fn())
    for batch in loader:              # a CollatedBatch (fusion.data.collate.Batch + num_dropped), or
        if batch is None:             # None when every sample of the batch was bad
            continue
        loss = model(**batch.model_inputs()).loss

The dataset holds no open file or video reader (media are opened inside each ``dataset[i]``), so it
pickles into ``DataLoader`` workers. Bad-sample counts are kept per process.

``group_by_media=True`` groups consecutive records that show the same single image, or the same single
video: ``dataset[i]`` is then one shared-prefix sample (`fusion.data.collate.share_prefix`) in which the
image (or the video's frames) is encoded once and each question is a branch that sees the media and
itself only, at the positions it would have on its own. Nothing leaks between the questions (a multi-turn
merge would let later answers be read off earlier ones), and every answer is supervised. A record joins
the group before it only if it has exactly that one image and no video (or that one video and no image),
at most one marker for it, no marker for the other kind, and no system turn other than the group's own.
The group's record keeps the first record's id, type and task; `Record.members` lists every grouped id,
`Record.group` the records. A bad record of a group (e.g. an empty answer) is left out of the sample and
skipped, counted and named (its own id, line and file) as it would be alone; the others are still trained,
and the sample is None only when none can be read.

``types=[...]`` keeps only the records whose ``type`` is one of those, ``media=[...]`` only those that show
an ``image``, a ``video`` or nothing (``text``), both before grouping: e.g. a later training stage that
leaves out the question types a model already answers, or that trains on a file's videos only.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tokenizer import content_text, count_media_markers, media_part_paths
from tokenizer.errors import (
    ConversationFormatError,
    MediaCountMismatchError,
    NoSupervisedTokensError,
    TokenizerError,
)
from vision.errors import ImageLoadError, ImageTooLargeError, VideoLoadError, VisionInputError, is_url

from ..errors import DatasetError
from .collate import Batch, pack_batch, pad_batch, share_prefix

__all__ = ["ConversationDataset", "MediaCache", "Record", "DatasetWarning", "CollatedBatch", "Collator", "collate",
           "infer_task", "read_records", "group_records", "classify_error", "TASKS"]

TASKS = ("vqa", "video-qa", "caption", "text")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}

# Reasons a sample is bad (the keys of `bad_counts`).
MALFORMED_JSON = "malformed json"
MISSING_FIELD = "missing field"
BAD_CONVERSATION = "bad conversation"
NO_ASSISTANT_TURN = "no assistant turn"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"
MISSING_VIDEO = "missing video"
UNREADABLE_VIDEO = "unreadable video"
MEDIA_COUNT_MISMATCH = "media count mismatch"
NO_SUPERVISED_TOKENS = "no supervised tokens"
CONFLICTING_MEDIA = "conflicting media"  # the media given twice: `images` and `image`, or a list and paths in parts



class DatasetWarning(UserWarning):
    """A sample or line of a dataset file was skipped (the message names it and says why)."""


@dataclass
class Record:
    """One sample's metadata, read without decoding any media.

    `images` and `videos` are resolved paths (joined to the dataset's root). `line` is the 1-based line
    of a JSONL file or the 1-based position in a JSON list. `members` lists the ids of the records that
    `group_by_media` grouped into this one, `group` the records themselves (empty when nothing was grouped).
    """

    id: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    type: str | None = None
    task: str | None = None
    line: int = 0
    members: tuple[str, ...] = ()
    group: tuple["Record", ...] = ()  # the grouped records, when `group_by_media` grouped several
    source_path: str = ""  # the file of a record that `join_media_groups` moved in from another dataset ("": this one)
    source_format: str = ""  # that file's format ("jsonl" or "json")

    @property
    def _last_assistant(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")

    @property
    def answer(self) -> str:
        """The reference answer: the content of the last assistant turn."""
        return self.messages[self._last_assistant]["content"]

    @property
    def prompt(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn: what a model answers."""
        return self.messages[:self._last_assistant]

    @property
    def media(self) -> list[str]:
        return self.images + self.videos

    @property
    def inferred_task(self) -> str:
        """`task` if the file gives one, else inferred (see `infer_task`)."""
        return self.task or infer_task(self)

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("group", "source_path", "source_format")}
        return {**fields, "members": list(self.members), "answer": self.answer}


def infer_task(record: Record) -> str:
    """The task of a record whose file names none: "caption" if its type says so, "video-qa" if it has
    a video, "vqa" if it has an image, else "text"."""
    if record.task:
        return record.task
    if record.type and "caption" in str(record.type).lower():
        return "caption"
    if record.videos:
        return "video-qa"
    if record.images:
        return "vqa"
    return "text"


class _BadRecord(Exception):
    def __init__(self, reason: str, message: str, sample_id: Any = None):
        super().__init__(message)
        self.reason, self.message, self.sample_id = reason, message, sample_id


TURNS_KEYS = ("conversations", "messages")  # where a sample's turns are (LLaVA / OpenAI-style)


def _given(value: Any) -> bool:
    return value is not None and value != [] and value != ""


def _paths(record: dict, plural: str, singular: str, sample_id) -> list[str]:
    """The record's `plural` (or `singular`) paths as given (not yet joined to the root)."""
    if _given(record.get(plural)) and _given(record.get(singular)):
        raise _BadRecord(CONFLICTING_MEDIA, f"the record gives both '{plural}' ({record[plural]!r}) and "
                                            f"'{singular}' ({record[singular]!r}); give one of them", sample_id)
    key = plural if plural in record and (_given(record[plural]) or not _given(record.get(singular))) else singular
    value = record.get(key)
    if not _given(value):  # null, [] or "" (what table exports write for "no image"): a text-only sample
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise _BadRecord(MISSING_FIELD, f"'{key}' must be a path or a list of paths, got {value!r}", sample_id)
    return value


def _resolve(paths: list[str], root: str) -> list[str]:
    # a URL stays as it is, so that reading it says it is one (media are never downloaded)
    return [p if is_url(p) else os.path.join(root, os.path.expanduser(p)) for p in paths]


def _drop_leading_assistant_turns(messages: list[dict]) -> list[dict]:
    """The conversation without the assistant turns before its first user turn (a LLaVA conversation that
    opens with a `gpt` turn: LLaVA's own preprocessing drops it too). They answer no question, so they are
    neither trained nor shown."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]


def _parse_record(obj: Any, line: int, root: str) -> Record:
    """A raw JSON value -> `Record`, or `_BadRecord` saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise _BadRecord(MISSING_FIELD, f"a sample must be a JSON object, got {type(obj).__name__}")
    sample_id = obj.get("id", obj.get("sample_id"))
    sample_id = f"line{line}" if sample_id is None else str(sample_id)
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns:
        what = "has no 'conversations' list" if turns is None else f"has 'conversations' = {turns!r}"
        close = difflib.get_close_matches("conversations", [str(key) for key in obj], n=1, cutoff=0.6)
        if turns is None and close:
            what += f" (it has {close[0]!r}: did you mean 'conversations'?)"
        raise _BadRecord(MISSING_FIELD, f"{what}; give a non-empty list of turns", sample_id)
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRecord(BAD_CONVERSATION, f"turn {k} is not an object: {turn!r}", sample_id)
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise _BadRecord(MISSING_FIELD, f"turn {k} needs 'role' and 'content' (or LLaVA's 'from' and 'value'), "
                                            f"got keys {sorted(turn)}", sample_id)
        if str(role).lower() not in ROLE_ALIASES:
            raise _BadRecord(BAD_CONVERSATION, f"turn {k} has unknown role {role!r}; use user/assistant/system "
                                               f"(or LLaVA's human/gpt)", sample_id)
        if isinstance(content, (int, float)) and not isinstance(content, bool):
            content = str(content)  # e.g. LLaVA's {"from": "gpt", "value": 4}
        try:  # a str, or a list of typed parts ({"type": "image"}, {"type": "text", "text": ...})
            part_paths = media_part_paths(content, f"turn {k} content")  # {"type": "image", "image": "a.png"}
            content = content_text(content, f"turn {k} content")
        except ConversationFormatError as err:
            raise _BadRecord(BAD_CONVERSATION, str(err), sample_id) from None
        messages.append({"role": ROLE_ALIASES[str(role).lower()], "content": content, "_parts": part_paths})
    # the media of every turn, a dropped leading assistant turn's too (they go where unmarked media go)
    part_paths = [found for m in messages for found in m.pop("_parts")]
    messages = _drop_leading_assistant_turns(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord(NO_ASSISTANT_TURN, "the conversation has no assistant turn (after its first user turn), "
                                            "so nothing to learn or to compare with", sample_id)
    images = _media_paths(obj, "images", "image", part_paths, sample_id)
    videos = _media_paths(obj, "videos", "video", part_paths, sample_id)
    images, videos = _resolve(images, root), _resolve(videos, root)
    kind, task = obj.get("type"), obj.get("task")
    return Record(id=sample_id, messages=messages, images=images, videos=videos,
                  type=None if kind is None else str(kind), task=None if task is None else str(task), line=line)


def _media_paths(obj: dict, plural: str, singular: str, part_paths: list, sample_id) -> list[str]:
    """The record's images (or videos): its `plural` / `singular` list, else the paths its typed parts
    carry ({"type": "image", "image": "img/a.png"}, in order); not both."""
    listed = _paths(obj, plural, singular, sample_id)
    in_parts = [(index, path) for index, (kind, path) in enumerate(k for k in part_paths if k[0] == singular)]
    named = [path for _, path in in_parts if path is not None]
    if not named:
        return listed
    if listed:
        raise _BadRecord(CONFLICTING_MEDIA, f"the record gives its {plural} both as '{plural}'/'{singular}' "
                                            f"({listed!r}) and as paths in its {{'type': '{singular}'}} parts "
                                            f"({named!r}); give them one way", sample_id)
    if len(named) < len(in_parts):
        missing = [index + 1 for index, path in in_parts if path is None]
        raise _BadRecord(MISSING_FIELD, f"{singular} part(s) {missing} (counting the {singular} parts of the "
                                        f"conversation from 1) name no file while others do; give every "
                                        f"{{'type': '{singular}'}} part its path, or list the files in "
                                        f"'{plural}'", sample_id)
    return named


def _is_sample_list(value: Any) -> bool:
    """Whether `value` is a list whose first item looks like a sample (an object with its turns)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and \
        any(key in value[0] for key in TURNS_KEYS)


def _holds_samples(obj: Any) -> bool:
    """Whether `obj` is one object wrapping a list of samples (`{"data": [...]}`), not a sample itself."""
    return isinstance(obj, dict) and not any(key in obj for key in TURNS_KEYS) and \
        any(_is_sample_list(value) for value in obj.values())


def read_records(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """Read a dataset file: returns `(format, records, bad)` where format is "jsonl" or "json",
    records the valid `Record`s and bad a list of `(line, reason, message, sample_id)`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith((".jsonl", ".json")))[:5]
        raise DatasetError(f"dataset file {path!r} is a folder; pass the .jsonl or .json file inside it"
                           + (f" (it holds {', '.join(found)})" if found else ""))
    if not os.path.isfile(path):
        raise DatasetError(f"dataset file {path!r} does not exist (working directory {os.getcwd()})")
    root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        with open(path, "rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
        raise DatasetError(f"{path}: is not UTF-8 text (the byte at offset {err.start} is not UTF-8"
                           + ("; it starts with a UTF-16 byte-order mark, as Windows PowerShell's '>' writes"
                              if utf16 else "") + "); save it as UTF-8") from None
    records, bad = [], []
    if text.lstrip().startswith("["):
        fmt = "json"
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: starts like a JSON list (LLaVA format) but is not valid JSON: {err}") from None
        numbered = list(enumerate(items, start=1))
    else:
        fmt = "jsonl"
        numbered = []
        # lines end at "\n" only ("\r\n" too): a JSON string may hold U+2028, U+2029 or U+0085 unescaped,
        # which str.splitlines() would take for line ends
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                bad.append((number, MALFORMED_JSON, f"not valid JSON ({err.msg} at column {err.colno})", None))
        whole = None
        if not numbered and bad:
            try:  # a pretty-printed single object: say so, rather than "every line is malformed"
                whole = json.loads(text)
            except json.JSONDecodeError:
                pass
        elif len(numbered) == 1 and not bad and _holds_samples(numbered[0][1]):  # one object holding the samples
            whole = numbered[0][1]
        if isinstance(whole, dict) and not any(key in whole for key in TURNS_KEYS):
            lists = [key for key, value in whole.items() if _is_sample_list(value)] or \
                [key for key, value in whole.items() if isinstance(value, list)]
            raise DatasetError(f"{path}: is one JSON object; expected JSON Lines (one sample per line) or a "
                               f"JSON list of samples (LLaVA format)"
                               + (f"; its samples may be the list under {lists[0]!r}: write that list alone"
                                  if lists else ""))
    for number, obj in numbered:
        try:
            records.append(_parse_record(obj, number, root))
        except _BadRecord as err:
            bad.append((number, err.reason, err.message, err.sample_id))
    return fmt, records, bad


def _most_common(counts: Counter, n: int = 3) -> str:
    return ", ".join(f"{reason} x{count}" for reason, count in counts.most_common(n))


def _count_markers(record: Record, kind: str) -> int:
    """How many media of `kind` ("image", "video") the record's messages place (escaped markers are text)."""
    return sum(count_media_markers(m["content"])[kind] for m in record.messages)


def _system_turn(record: Record) -> str | None:
    first = record.messages[0]
    return first["content"] if first["role"] == "system" else None


def _group_key(record: Record) -> tuple[str, str] | None:
    """("image", path) or ("video", path) for a record that shows one medium only, else None."""
    images, videos = _count_markers(record, "image"), _count_markers(record, "video")
    if len(record.images) == 1 and not record.videos and images <= 1 and videos == 0:
        return ("image", record.images[0])
    if len(record.videos) == 1 and not record.images and videos <= 1 and images == 0:
        return ("video", record.videos[0])
    return None


MEDIA_KINDS = ("image", "video", "text")


def media_kind(record: Record) -> str:
    """"video" if the record shows a video, else "image" if it shows an image, else "text"."""
    return "video" if record.videos else "image" if record.images else "text"


def select_records(records: Sequence[Record], types: Sequence[str] | None, media: Sequence[str] | None,
                   path: str = "dataset") -> list[Record]:
    """The records whose type is in `types` and whose `media_kind` is in `media` (None: no condition).
    Raises `DatasetError` when the condition leaves none, naming the types and kinds the file has."""
    if isinstance(types, str) or isinstance(media, str):
        raise DatasetError(f"{path}: types and media are lists (e.g. types=['position']), got "
                           f"types={types!r}, media={media!r}")
    unknown = sorted(set(media or ()) - set(MEDIA_KINDS))
    if unknown:
        raise DatasetError(f"{path}: unknown media {unknown}; choose from {list(MEDIA_KINDS)}")
    if types is None and media is None:
        return list(records)
    kept = [r for r in records if (types is None or r.type in types) and (media is None or media_kind(r) in media)]
    if not kept:
        have_types = sorted({str(r.type) for r in records})
        have_media = sorted({media_kind(r) for r in records})
        raise DatasetError(f"{path}: no record has type in {list(types) if types is not None else 'any'} and "
                           f"media in {list(media) if media is not None else 'any'}; the file's types are "
                           f"{have_types}, its media {have_media}")
    return kept


def group_records(records: Sequence[Record], max_group_size: int | None = None) -> list[Record]:
    """Group runs of consecutive records with the same single image or video (see the module docstring)."""
    groups: list[list[Record]] = []
    for record in records:
        last = groups[-1] if groups else None
        key = _group_key(record)
        if (last is not None and key is not None and key == _group_key(last[0])
                and (max_group_size is None or len(last) < max_group_size)
                and _system_turn(record) in (None, _system_turn(last[0]))):
            last.append(record)
        else:
            groups.append([record])
    return [_make_group(group) for group in groups]


def _make_group(records: Sequence[Record]) -> Record:
    return records[0] if len(records) == 1 else dataclasses.replace(
        records[0], members=tuple(r.id for r in records), group=tuple(records))


def join_media_groups(datasets: Sequence["ConversationDataset"]) -> list["ConversationDataset"]:
    """Move the questions of a later dataset about a medium that an earlier one already shows into that
    earlier sample, so the medium is encoded once for all of them (the datasets must group by media).

    E.g. `train.jsonl` + `train_extra.jsonl` (more questions about the same images): each image becomes one
    sample with its questions from both files, in file order, instead of a sample per file. Groups keep
    the order of their first file; records of a later file that no earlier file shows stay where they
    are. Returns the datasets that still have samples.
    """
    first_group: dict[tuple, tuple[ConversationDataset, int]] = {}
    for dataset in datasets:
        if not dataset.group_by_media:
            raise ValueError(f"join_media_groups: {dataset.path} does not group by media")
        kept, shown = [], {}
        for record in dataset.records:
            key = (_group_key(record), _system_turn(record))
            if key[0] is not None and key in first_group:
                owner, index = first_group[key]
                joined = owner.records[index]
                moved = [r if r.source_path else dataclasses.replace(r, source_path=dataset.path,
                                                                      source_format=dataset.format)
                         for r in (record.group or (record,))]  # bad ones are named with their own file
                owner.records[index] = _make_group([*(joined.group or (joined,)), *moved])
                continue
            if key[0] is not None:
                shown.setdefault(key, (dataset, len(kept)))  # within one file only runs are grouped
            kept.append(record)
        dataset.records = kept
        dataset.clear_cache()  # indices moved
        first_group.update({k: v for k, v in shown.items() if k not in first_group})
    return [d for d in datasets if d.records]


class MediaCache:
    """Processed media (normalised image tiles, sampled and normalised video frames) by file, kept in
    memory and shared by the datasets given it: each image or video is decoded once.

    Holds the media of one processor: asked with another (e.g. a stage that starts from another model),
    it forgets what the previous one made. Costs about 4 x 3 x H x W bytes per image tile or video
    frame. A medium that fails to load is not kept (its error is raised each time it is asked for).
    """

    def __init__(self):
        self._media: dict[tuple, Any] = {}
        self._processor = None

    def process(self, processor, images: Sequence[str], videos: Sequence[str], num_frames: int | None = None,
                fps: float | None = None):
        """`processor.process_media(images, videos, ...)`, from memory after the first call."""
        if processor is not self._processor:
            self._media.clear()
            self._processor = processor
        key = (tuple(images), tuple(videos), num_frames, fps)
        media = self._media.get(key)
        if media is None:
            media = self._media[key] = processor.process_media(images, videos, num_frames=num_frames, fps=fps)
        return media

    def __len__(self) -> int:
        return len(self._media)


_READ_ERRORS = (VisionInputError, TokenizerError, OSError)


class ConversationDataset(torch.utils.data.Dataset):
    """Conversations with images and videos from a JSONL or LLaVA JSON file (see the module docstring).

    Args:
        path: the dataset file.
        processor: a `fusion.FusionProcessor` (e.g. `model.processor`).
        root: the folder media paths are relative to (default: the file's folder).
        strict: raise `DatasetError` on the first bad line or sample instead of skipping it.
        group_by_media: merge consecutive records with the same single image or video into one sample
            that encodes it once (see the module docstring).
        max_group_size: the most records merged into one (None: no limit).
        num_frames, fps: video frame sampling (None: the processor's settings).
        min_attempts, max_bad_fraction: stop with `DatasetError` once at least `min_attempts` records
            were read and more than `max_bad_fraction` of them were bad (a grouped sample: each of its records).
        max_warnings: warn about this many bad samples (per process), then count the rest silently.
        cache: keep each processed sample in memory after its first read, so later epochs skip decoding,
            resizing and tokenizing (the same sample either way: processing is deterministic). Costs
            about 4 x 3 x H x W bytes per image or video frame (float32 pixels) plus the token ids, per
            process and per `DataLoader` worker; bad samples are not kept (they are read, and counted, again).
        media_cache: a `MediaCache` that several datasets share (e.g. a training file and a file of more
            questions about the same images, or the stages of a run): each medium is decoded once for all.
        types: keep only the records whose `type` is one of these (None: all).
        media: keep only the records that show one of these: "image", "video" (a record with both counts
            as "video"), "text" (neither) (None: all).

    `dataset[i]` is a `ProcessedSample` or None (a bad sample: skipped, counted, warned about);
    `dataset.records[i]` its `Record` (id, type, task, answer, messages, media paths).
    """

    def __init__(self, path: str | os.PathLike, processor, root: str | os.PathLike | None = None, strict: bool = False,
                 group_by_media: bool = False, *, max_group_size: int | None = None, num_frames: int | None = None,
                 fps: float | None = None, min_attempts: int = 20, max_bad_fraction: float = 0.5,
                 max_warnings: int = 20, cache: bool = False, media_cache: "MediaCache | None" = None,
                 types: Sequence[str] | None = None, media: Sequence[str] | None = None):
        self.path = os.fspath(path)
        self.root = os.path.dirname(os.path.abspath(self.path)) if root is None else os.fspath(root)
        self.processor = processor
        self.strict = strict
        self.group_by_media = group_by_media
        self.num_frames, self.fps = num_frames, fps
        self.min_attempts, self.max_bad_fraction = min_attempts, max_bad_fraction
        self.max_warnings = max_warnings
        self.bad_counts: Counter = Counter()  # reason -> number of bad lines and samples (load time + reads)
        self.num_attempted = 0  # records read by dataset[i] calls in this process (a group: each of its records)
        self.num_bad = 0  # of those, the bad ones (skipped: a bad sample is None, a group leaves its bad records out)
        self._warned = 0
        self.cache, self.media_cache = cache, media_cache
        self._cached: dict[int, Any] = {}  # index -> processed sample (cache=True)

        self.format, records, bad = read_records(self.path, self.root)
        for line, reason, message, sample_id in bad:
            self.bad_counts[reason] += 1
            named = f"sample {sample_id!r} ({self.where(line)})" if sample_id is not None else self.where(line)
            if strict:
                raise DatasetError(f"{self.path}: {named}: {reason}: {message}")
            self._warn(f"{self.path}: skipped {named}: {reason}: {message}")
        self.bad_at_load = list(bad)  # (line, reason, message, sample_id) of each record that could not be used
        total = len(records) + len(bad)
        if total == 0:
            raise DatasetError(f"{self.path}: has no samples")
        if not records:
            raise DatasetError(f"{self.path}: none of its {total} records can be used "
                               f"({_most_common(self.bad_counts)})")
        if total >= min_attempts and len(bad) > max_bad_fraction * total:
            raise DatasetError(f"{self.path}: {len(bad)} of its {total} records are malformed "
                               f"({_most_common(self.bad_counts)}); is this the right file and format?")
        self.source_records: list[Record] = select_records(records, types, media, self.path)
        records = self.source_records
        self.records: list[Record] = group_records(records, max_group_size) if group_by_media else records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        self.num_attempted += len(record.group) or 1  # records, not samples: a group counts each of its questions
        sample = self._cached.get(index)
        if sample is not None:
            return sample
        if record.group:
            sample, complete = self._process_group(record)
        else:
            try:
                sample, complete = self._process(record), True
            except _READ_ERRORS as err:
                sample, complete = self._bad_sample(record, err), False
        if not complete:
            self._check_mostly_bad()
        if self.cache and complete:  # a group with a bad member is read (and its bad member counted) again
            self._cached[index] = sample
        return sample

    def _media(self, record: Record):
        if self.media_cache is not None:
            return self.media_cache.process(self.processor, record.images, record.videos, self.num_frames, self.fps)
        return self.processor.process_media(record.images, record.videos, num_frames=self.num_frames, fps=self.fps)

    def _process(self, record: Record):
        if self.media_cache is None:
            return self.processor(record.messages, record.images, record.videos, sample_id=record.id,
                                  num_frames=self.num_frames, fps=self.fps)
        return self.processor(record.messages, sample_id=record.id, media=self._media(record))

    def _process_group(self, record: Record):
        """`(sample, complete)`: the group's records that can be read as one shared-prefix sample (None when
        none can), and whether all could. Each bad record is skipped, counted and named on its own."""
        try:  # the group's records show the same one image or video: decode and normalise it once
            media = self._media(record)
        except _READ_ERRORS as err:  # every record of the group shows it: each is bad
            for member in record.group:
                self._bad_sample(member, err)
            return None, False
        samples = []
        for member in record.group:
            try:
                samples.append(self.processor(member.messages, sample_id=member.id, media=media))
            except _READ_ERRORS as err:
                self._bad_sample(member, err)
        if not samples:
            return None, False
        return share_prefix(samples, self.processor.tokenizer.patch_id), len(samples) == len(record.group)

    def _bad_sample(self, record: Record, error: BaseException) -> None:
        """Count and name one bad record (its own file and line, also when `join_media_groups` moved it here)."""
        reason = classify_error(error, record)
        path = record.source_path or self.path
        where = self.where(record.line, record.source_format or self.format)
        message = f"{path}: sample {record.id!r} ({where}): {reason}: {error}"
        if self.strict:
            raise DatasetError(message) from error
        self.num_bad += 1
        self.bad_counts[reason] += 1
        self._warn(message.replace(": sample", ": skipped sample", 1))
        return None

    @property
    def num_bad_at_load(self) -> int:
        return len(self.bad_at_load)

    def clear_cache(self) -> None:
        """Forget the processed samples kept by `cache=True` (e.g. after changing `records`)."""
        self._cached.clear()

    def where(self, line: int, format: str | None = None) -> str:
        """"line N" of a JSONL file, "item N" of a JSON list (1-based); `format`: another file's ("jsonl", "json")."""
        return f"line {line}" if (format or self.format) == "jsonl" else f"item {line}"

    def _warn(self, message: str) -> None:
        self._warned += 1
        if self._warned <= self.max_warnings:
            warnings.warn(message, DatasetWarning, stacklevel=3)
        elif self._warned == self.max_warnings + 1:
            warnings.warn(f"{self.path}: more bad samples; they are counted in dataset.bad_counts without a warning "
                          f"each", DatasetWarning, stacklevel=3)

    def _check_mostly_bad(self) -> None:
        """`DatasetError` once `min_attempts` records were read and more than `max_bad_fraction` were bad (records:
        a group of questions about one image counts each question)."""
        if self.num_attempted >= self.min_attempts and self.num_bad > self.max_bad_fraction * self.num_attempted:
            hint = ""
            if self.bad_counts.most_common(1)[0][0] in (MISSING_IMAGE, MISSING_VIDEO):
                hint = f"; media paths are read relative to root={self.root!r}: is that the right folder?"
            raise DatasetError(f"{self.path}: {self.num_bad} of the {self.num_attempted} samples read so far were bad "
                               f"(most common: {_most_common(self.bad_counts)}){hint}")

    def summary(self) -> dict:
        """Counts as a JSON-serialisable dict."""
        return {"path": self.path, "format": self.format, "records": len(self.records),
                "source_records": len(self.source_records), "bad_at_load": self.num_bad_at_load,
                "attempted": self.num_attempted, "bad_reads": self.num_bad, "bad_counts": dict(self.bad_counts)}

    def collate_fn(self, pack: bool = False, max_length: int | None = None) -> "Collator":
        """A `Collator` for a `DataLoader` over this dataset (pad id from the processor's tokenizer)."""
        return Collator(self.processor.tokenizer.pad_id, pack=pack, max_length=max_length)

    def __repr__(self) -> str:
        grouped = f", grouped from {len(self.source_records)}" if self.group_by_media else ""
        return f"ConversationDataset({self.path!r}, {len(self)} samples{grouped}, format={self.format})"


def classify_error(err: BaseException, record: Record) -> str:
    """The bad-sample reason for an error raised while processing `record`."""
    if isinstance(err, ImageTooLargeError):
        return IMAGE_TOO_LARGE
    if isinstance(err, ImageLoadError):
        return MISSING_IMAGE if any(not os.path.isfile(p) for p in record.images) else UNREADABLE_IMAGE
    if isinstance(err, VideoLoadError):
        return MISSING_VIDEO if any(not os.path.isfile(p) for p in record.videos) else UNREADABLE_VIDEO
    if isinstance(err, MediaCountMismatchError):
        return MEDIA_COUNT_MISMATCH
    if isinstance(err, NoSupervisedTokensError):
        return NO_SUPERVISED_TOKENS
    if isinstance(err, (ConversationFormatError, TokenizerError)):
        return BAD_CONVERSATION
    if isinstance(err, VisionInputError):
        return UNREADABLE_IMAGE if record.images else UNREADABLE_VIDEO
    return "unreadable file"


# ---------------------------------------------------------------------------------------------------
# Batching for a plain DataLoader


@dataclass
class CollatedBatch(Batch):
    """A `Batch` that also says how many of the samples handed to the collator were dropped (None)."""

    num_dropped: int = 0

    def to(self, device) -> "CollatedBatch":
        return CollatedBatch(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()})


def collate(samples: Sequence, pad_id: int, *, pack: bool = False, max_length: int | None = None,
            padding_side: str = "right") -> CollatedBatch | None:
    """Drop the `None`s (bad samples), then `pad_batch` (or `pack_batch` into rows of `max_length`).

    Returns None when every sample was bad.
    """
    good = [s for s in samples if s is not None]
    dropped = len(samples) - len(good)
    if not good:
        return None
    if pack:
        if max_length is None:
            raise ValueError("collate: pack=True needs max_length (the tokens per packed row)")
        batch = pack_batch(good, pad_id, max_length)
    else:
        batch = pad_batch(good, pad_id, padding_side=padding_side)
    return CollatedBatch(**vars(batch), num_dropped=dropped)


class Collator:
    """A picklable `collate_fn`: `collate` with fixed settings, keeping running totals (in this process)."""

    def __init__(self, pad_id: int, pack: bool = False, max_length: int | None = None, padding_side: str = "right"):
        if pack and max_length is None:
            raise ValueError("Collator: pack=True needs max_length (the tokens per packed row)")
        self.pad_id, self.pack, self.max_length, self.padding_side = pad_id, pack, max_length, padding_side
        self.total_dropped = 0
        self.empty_batches = 0

    def __call__(self, samples: Sequence) -> CollatedBatch | None:
        batch = collate(samples, self.pad_id, pack=self.pack, max_length=self.max_length,
                        padding_side=self.padding_side)
        self.total_dropped += sum(s is None for s in samples)
        self.empty_batches += batch is None
        return batch
