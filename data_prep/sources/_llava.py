"""The LLaVA conversation layout that several video instruction sets publish (ShareGPT4Video, VISTA,
LLaVA-Video-178K): JSON (a list) or JSONL of ``{"id", "video", "conversations": [{"from": "human"|"gpt",
"value"}, ...]}``, with ``video`` a path relative to the media folder. Every turn is kept (multi-turn stays
multi-turn); the ``<video>`` placeholder is dropped because fovlm puts the frames before the text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import MediaIndex, Record, annotation_files, llava_messages, read_rows
from data_prep.writer import Skip


def llava_records(name: str, input: Path, media: Path | None, pattern: str = "*") -> Iterator[Record | Skip]:
    """Records of every annotation file under ``input`` (or ``input`` itself); videos under ``media``
    (default: the folder of the annotations)."""
    files = annotation_files(input, pattern)
    index = MediaIndex(media or (input if input.is_dir() else input.parent))
    for path in files:
        for number, row in enumerate(read_rows(path)):
            if isinstance(row, Skip):
                yield row
                continue
            item = str(row.get("id") or f"{path.name}[{number}]")
            video = row.get("video")
            if not isinstance(video, str) or not video.strip():
                yield Skip(item, "bad_row", "no 'video' path")
                continue
            try:
                messages = llava_messages(row.get("conversations"))
            except ValueError as err:
                yield Skip(item, "bad_row", str(err))
                continue
            meta = {"video_id": str(row.get("id") or Path(video).stem)}
            yield Record(item, name, "video", {"messages": messages}, video=index.find(video.strip()), meta=meta)
