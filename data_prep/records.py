"""Records (one input item of any source, before conversion), building a sample from one, and the row
readers and text helpers the source modules share.

A :class:`Record` holds the sample's text fields in the shard JSON's own names (``caption``, or
``messages``, or ``messages`` + ``chosen`` / ``rejected``, or ``question`` / ``options`` / ``answer`` /
``category``), where its media lives, and metadata. :func:`build_record` converts the media
(:mod:`data_prep.media`), validates the JSON with :func:`fovlm.data.schema.parse_sample` (the loader's own
parser, so a shard never holds a sample the loader would reject) and returns the tar members.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.media import Converted, MediaOptions, SkipItem, convert_images, convert_video, read_file
from data_prep.writer import Built, Skip
from fovlm.data.schema import SampleError, parse_sample


@dataclass(frozen=True)
class Record:
    """One input item.

    Args:
        item: the id listed in the manifest (video id, clip id, row number).
        source: the sample's ``source`` (dataset name).
        media: ``"video"``, ``"image"`` or ``"text"``.
        text: the JSON text fields (schema names).
        video: path of the video file (media ``video``).
        images: the images (media ``image``): bytes, or paths of files.
        meta: further JSON fields (``video_id``, ``fps``, benchmark details...).
        clip: ``(start, end)`` seconds: only this segment of the video is sampled.
    """

    item: str
    source: str
    media: str
    text: dict[str, Any]
    video: str | None = None
    images: tuple[bytes | str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    clip: tuple[float, float] | None = None


def build_record(key: str, record: Record, options: MediaOptions) -> Built:
    """Convert one record into tar members (``json`` + frames / mp4), validated by the shard schema."""
    converted: Converted | None = None
    if record.media == "video":
        if not record.video:
            raise SkipItem("bad_row", "a video item without a video path")
        converted = convert_video(read_file(record.video), options, record.video, record.clip)
    elif record.media == "image":
        datas = [read_file(i) if isinstance(i, str) else i for i in record.images]
        names = [i if isinstance(i, str) else f"{record.item} image {n}" for n, i in enumerate(record.images)]
        converted = convert_images(datas, options, names)
    elif record.media != "text":
        raise SkipItem("bad_row", f"unknown media {record.media!r}")
    obj: dict[str, Any] = {"source": record.source, "media": converted.media if converted else "text"}
    obj.update(record.text)
    obj.update(record.meta)
    if converted is not None and converted.duration is not None and converted.duration > 0:
        obj["duration"] = round(converted.duration, 3)
    members = dict(converted.members) if converted else {}
    try:
        parse_sample(obj, key, list(members))
    except SampleError as err:
        raise SkipItem("invalid_sample", str(err)) from err
    members["json"] = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return Built(record.item, members=members, source=record.source,
                 num_frames=converted.num_frames if converted else 0)


# -- readers -------------------------------------------------------------------------------------------


def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any] | Skip]:
    """Rows of an annotation file as dicts: ``.jsonl``, ``.json`` (a list of objects, or an object of
    objects keyed by id), ``.csv`` or ``.parquet`` (needs ``pyarrow``).

    A row that is not a JSON object or not UTF-8 becomes a :class:`Skip` (``bad_row``) naming the file and
    line; a whole file that cannot be parsed becomes one :class:`Skip` (``bad_file``): one broken file of a
    dataset's many does not end the run."""
    path = Path(path)
    name = path.name
    if name.endswith(".jsonl"):
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    yield Skip(f"{name}:{number}", "bad_row", f"not UTF-8 JSON ({err})")
                    continue
                if not isinstance(row, dict):
                    yield Skip(f"{name}:{number}", "bad_row", f"expected an object, got {type(row).__name__}")
                    continue
                yield row
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            yield Skip(name, "bad_file", f"not UTF-8 JSON ({err})")
            return
        rows = data.values() if isinstance(data, dict) else data if isinstance(data, list) else [data]
        for number, row in enumerate(rows):
            if isinstance(row, dict):
                yield row
            else:
                yield Skip(f"{name}[{number}]", "bad_row", f"expected an object, got {type(row).__name__}")
    elif name.endswith(".csv"):
        # surrogateescape keeps a non-UTF-8 row readable, so that it alone is skipped.
        with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v) for v in row.values()):
                    yield Skip(f"{name}:{reader.line_num}", "bad_row", "not UTF-8")
                    continue
                yield row
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise SystemExit(f"reading {path} needs pyarrow (pip install pyarrow), or export it to .jsonl") from err
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                yield from batch.to_pylist()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
            yield Skip(name, "bad_file", f"unreadable parquet ({err})")
    else:
        raise ValueError(f"{path}: unknown annotation format (expected .jsonl, .json, .csv or .parquet)")


ANNOTATION_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def annotation_files(path: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """``path`` itself, or the annotation files matching ``pattern`` under the folder ``path`` (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SystemExit(f"--input {path} does not exist")
    files = sorted(p for p in path.rglob(pattern) if p.is_file() and p.suffix in ANNOTATION_SUFFIXES)
    if not files:
        raise SystemExit(f"--input {path}: no annotation file matching {pattern!r}")
    return files


@dataclass(frozen=True)
class VideoRow:
    """One annotation row that names a video: its id, its file, the row, the video's path or id (as written,
    not stripped) and the row's schema text fields."""

    item: str
    path: Path
    row: Mapping[str, Any]
    video: str
    text: dict[str, Any]


def video_rows(
    files: Sequence[Path],
    column: str,
    text: Callable[[Mapping[str, Any]], dict[str, Any]],
    item_id: Callable[[Path, int, Mapping[str, Any]], str],
    missing: str | None = None,
) -> Iterator[VideoRow | Skip]:
    """Every row of the annotation files (:func:`read_rows`, numbered from 0 per file) that names a video, or
    the skip that says what is wrong with it.

    Args:
        files: the annotation files, read in order.
        column: the column holding the video's path or id.
        text: the row's schema text fields; raises ValueError on a malformed row (a ``bad_row`` skip).
        item_id: the id a row is listed under, from its file, number and contents.
        missing: the skip's detail when ``column`` is absent or blank (default ``no '<column>'``).
    """
    for path in files:
        for number, row in enumerate(read_rows(path)):
            if isinstance(row, Skip):
                yield row
                continue
            item = item_id(path, number, row)
            video = row.get(column)
            try:
                if not isinstance(video, str) or not video.strip():
                    raise ValueError(missing or f"no '{column}'")
                yield VideoRow(item, path, row, video, text(row))
            except ValueError as err:
                yield Skip(item, "bad_row", str(err))


def image_ref(value: Any, base: Path) -> bytes | str:
    """An image cell as the dataset tools store it: ``{"bytes": ..., "path": ...}`` (parquet: raw bytes;
    JSON exports: base64 text), raw bytes, or a path (relative to ``base``)."""
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if isinstance(data, bytes | bytearray) and data:
            return bytes(data)
        if isinstance(data, str) and data:
            return base64.b64decode(data)
        value = value.get("path")
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value)
    if isinstance(value, str) and value:
        return str(base / value)
    raise ValueError(f"not an image cell: {type(value).__name__}")


_PLACEHOLDER = re.compile(r"<(video|image)>\s*")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llava_messages(conversations: Any) -> list[dict[str, str]]:
    """LLaVA-style turns (``[{"from": "human"|"gpt", "value": ...}]``) -> schema messages, every turn kept.

    The ``<video>`` / ``<image>`` placeholders go (the frames always come first in fovlm's layout); a
    trailing user turn without an answer is dropped. Raises ValueError on a malformed list."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' is not a non-empty list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, Mapping):
            raise ValueError(f"a turn is a {type(turn).__name__}, not an object")
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise ValueError(f"a turn without a known role or text: {dict(turn)!r:.200}")
        messages.append({"role": role, "content": _PLACEHOLDER.sub("", value).strip()})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not messages:
        raise ValueError("no assistant turn")
    return messages


_LETTER = re.compile(r"^\s*\(?([A-Z])[.)]\s+")


def strip_option_letter(option: str) -> str:
    """``"B. a cat"`` / ``"(B) a cat"`` -> ``"a cat"`` (benchmarks ship options with or without letters)."""
    return _LETTER.sub("", option, count=1).strip()


def answer_index(answer: Any, options: Sequence[str]) -> int:
    """The answer as an index into ``options``: an int, a letter (``"B"``, ``"B."``), or the option text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str):
        text = answer.strip()
        stripped = [strip_option_letter(o) for o in options]
        if text in options:
            index = list(options).index(text)
        elif strip_option_letter(text) in stripped and len(text) > 2:
            index = stripped.index(strip_option_letter(text))
        elif re.fullmatch(r"\(?[A-Z][.)]?", text):
            index = ord(text.strip("().")) - ord("A")
        else:
            raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options")
    else:
        raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options")
    if not 0 <= index < len(options):
        raise ValueError(f"answer {answer!r} is outside the {len(options)} options")
    return index


class MediaIndex:
    """Finds a media file by its relative path under a root, or else by its file name anywhere below the
    root (datasets are often extracted into a different folder structure than their annotations name)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._by_name: dict[str, str] | None = None

    def find(self, relative: str) -> str:
        """The path to read (which may not exist: the build step then skips it as ``missing_file``)."""
        direct = self.root / relative
        if direct.exists():
            return str(direct)
        if self._by_name is None:
            self._by_name = {}
            for folder, _, files in os.walk(self.root):
                for name in files:
                    self._by_name.setdefault(name, os.path.join(folder, name))
        return self._by_name.get(Path(relative).name, str(direct))
