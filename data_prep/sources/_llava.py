"""The LLaVA conversation layout that several video instruction sets publish (ShareGPT4Video, VISTA,
LLaVA-Video-178K): JSON (a list) or JSONL of ``{"id", "video", "conversations": [{"from": "human"|"gpt",
"value"}, ...]}``, with ``video`` a path relative to the media folder. Every turn is kept (multi-turn stays
multi-turn); the ``<video>`` placeholder is dropped because fovlm puts the frames before the text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.records import MediaIndex, Record, VideoRow, annotation_files, llava_messages, video_rows
from data_prep.writer import Skip


def llava_records(name: str, input: Path, media: Path | None, pattern: str = "*") -> Iterator[Record | Skip]:
    """Records of every annotation file under ``input`` (or ``input`` itself); videos under ``media``
    (default: the folder of the annotations)."""
    files = annotation_files(input, pattern)
    index = MediaIndex(media or (input if input.is_dir() else input.parent))
    for entry in video_rows(files, "video", _text, _item_id, missing="no 'video' path"):
        yield entry if isinstance(entry, Skip) else _record(name, entry, index)


def _item_id(path: Path, number: int, row: dict[str, Any]) -> str:
    return str(row.get("id") or f"{path.name}[{number}]")


def _record(name: str, entry: VideoRow, index: MediaIndex) -> Record:
    meta = {"video_id": str(entry.row.get("id") or Path(entry.video).stem)}
    return Record(entry.item, name, "video", entry.text, video=index.find(entry.video.strip()), meta=meta)


def _text(row: dict[str, Any]) -> dict[str, Any]:
    """The row's turns as schema messages."""
    return {"messages": llava_messages(row.get("conversations"))}
