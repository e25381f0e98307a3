"""Vript (``Mutonix/Vript``): densely captioned video scenes ("video scripts").

Published layout: ``vript_captions/vript_{long,short}_videos_captions.zip`` extracts to one
``{video_id}_caption.json`` per video: ``{"meta": {"video_id", "video_title", ...}, "data": {clip_id:
{"video_id", "clip_id", "video_title", "caption": {"shot_type", "camera_movement", "content",
"scene_title"}, "voiceover": [...]}}}``; the same captions also ship as ``.jsonl`` (one such object per
line, or one clip object per line: both are read). The clips (``vript_*_videos_clips/*.zip``) extract to
``{clip_id}.mp4`` files, usually in one folder per video.

``input``: a caption file, or a folder of them. ``media``: the extracted clips (default: ``clips/`` beside
the captions), searched by ``{video_id}/{clip_id}.mp4`` and then by file name. Each scene becomes a caption
sample ``"{scene_title}: {content}"`` (the fVLM original's text), with the per-source prompt as user turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.records import MediaIndex, Record, annotation_files, read_rows
from data_prep.writer import Skip

NAME = "vript"


def _clips(row: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(row.get("data"), dict):
        return [c for c in row["data"].values()]
    return [row]


def _load(path: Path) -> dict[str, Any] | Skip:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return Skip(path.name, "bad_row", f"not JSON ({err})")
    return obj if isinstance(obj, dict) else Skip(path.name, "bad_row", "not a JSON object")


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    files = annotation_files(input, "*caption*")
    index = MediaIndex(media or (input if input.is_dir() else input.parent) / "clips")
    for path in files:
        # A per-video caption file is one object ({"meta", "data"}); a .jsonl holds one object per line.
        rows = [_load(path)] if path.suffix == ".json" else read_rows(path)
        for number, row in enumerate(rows):
            if isinstance(row, Skip):
                yield row
                continue
            for clip in _clips(row):
                caption = clip.get("caption") if isinstance(clip, dict) else None
                clip_id = str(clip.get("clip_id") or "") if isinstance(clip, dict) else ""
                content = caption.get("content") if isinstance(caption, dict) else None
                if not clip_id or not isinstance(content, str) or not content.strip():
                    yield Skip(clip_id or f"{path.name}[{number}]", "bad_row", "no clip_id or caption content")
                    continue
                title = caption.get("scene_title")
                text = f"{title.strip()}: {content.strip()}" if isinstance(title, str) and title.strip() else content
                video_id = str(clip.get("video_id") or clip_id.rsplit("-Scene-", 1)[0])
                yield Record(clip_id, NAME, "video", {"caption": text.strip()},
                             video=index.find(f"{video_id}/{clip_id}.mp4"), meta={"video_id": clip_id})
