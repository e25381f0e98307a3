"""Video-MME (``lmms-lab/Video-MME``): 2,700 questions on 900 videos (short, medium, long).

Published layout: ``videomme/test-00000-of-00001.parquet`` with columns ``video_id``, ``duration``
(``short`` / ``medium`` / ``long``), ``domain``, ``sub_category``, ``url``, ``videoID``, ``question_id``,
``task_type``, ``question``, ``options`` (``["A. ...", "B. ...", ...]``), ``answer`` (a letter); videos
``data/{videoID}.mp4`` from the ``videos_chunked_*.zip`` archives. A ``.jsonl`` export is read too.

``input``: the parquet/jsonl file (or a folder of them); ``media``: default ``data/`` beside the
``videomme/`` folder. Samples: ``question``, ``options`` (letters stripped), ``answer`` (index),
``category`` (``task_type``), plus ``duration_group``, ``domain``, ``sub_category``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import MediaIndex, Record, annotation_files, video_rows
from data_prep.sources._mcq import mcq_text
from data_prep.writer import Skip

NAME = "videomme"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    files = annotation_files(input)
    index = MediaIndex(media or files[0].parent.parent / "data")
    for entry in video_rows(files, "videoID", mcq_text, _item_id):
        if isinstance(entry, Skip):
            yield entry
            continue
        row, video, text = entry.row, entry.video.strip(), entry.text
        text["category"] = str(row.get("task_type") or "unknown")
        meta = {"video_id": video}
        for src, dst in (("duration", "duration_group"), ("domain", "domain"), ("sub_category", "sub_category")):
            if isinstance(row.get(src), str):
                meta[dst] = row[src]
        yield Record(entry.item, NAME, "video", text, video=index.find(f"{video}.mp4"), meta=meta)


def _item_id(path: Path, number: int, row: dict) -> str:
    return str(row.get("question_id") or f"{path.stem}[{number}]")
