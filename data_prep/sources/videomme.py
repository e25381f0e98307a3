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

from data_prep.records import MediaIndex, Record, annotation_files, read_rows
from data_prep.sources._mcq import mcq_text
from data_prep.writer import Skip

NAME = "videomme"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    files = annotation_files(input)
    index = MediaIndex(media or files[0].parent.parent / "data")
    for path in files:
        for number, row in enumerate(read_rows(path)):
            if isinstance(row, Skip):
                yield row
                continue
            item = str(row.get("question_id") or f"{path.stem}[{number}]")
            video = row.get("videoID")
            try:
                if not isinstance(video, str) or not video.strip():
                    raise ValueError("no 'videoID'")
                text = mcq_text(row)
            except ValueError as err:
                yield Skip(item, "bad_row", str(err))
                continue
            text["category"] = str(row.get("task_type") or "unknown")
            meta = {"video_id": video.strip()}
            for src, dst in (("duration", "duration_group"), ("domain", "domain"), ("sub_category", "sub_category")):
                if isinstance(row.get(src), str):
                    meta[dst] = row[src]
            yield Record(item, NAME, "video", text, video=index.find(f"{video.strip()}.mp4"), meta=meta)
