"""OpenVid-1M (``nkp37/OpenVid-1M``): captioned clips for stage 1 (and 2).

Published layout: ``data/train/OpenVid-1M.csv`` with columns ``video`` (the clip's file name), ``caption``
and scores (``aesthetic score``, ``motion score``, ..., ``frame``, ``fps``, ``seconds``); the clips come in
zip parts (``OpenVid_partN.zip``) that extract to a folder of ``.mp4`` files.

``input``: the CSV, or the dataset folder (every ``*.csv`` below it). ``media``: the folder the parts were
extracted to (default: ``video/`` in the dataset folder or beside the CSV, else the dataset folder itself);
a clip is looked up by its name there, or anywhere below it. Each row becomes a caption sample (the
caption is kept as written; the user turn is the per-source prompt).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import MediaIndex, Record, annotation_files, read_rows
from data_prep.writer import Skip

NAME = "openvid"


def default_media(input: Path, name: str) -> Path:
    """``name/`` in the dataset folder (or beside the annotation file) if it exists, else that folder."""
    root = input if input.is_dir() else input.parent
    return root / name if (root / name).is_dir() else root


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    index = MediaIndex(media or default_media(input, "video"))
    for path in annotation_files(input, "*.csv"):
        for number, row in enumerate(read_rows(path), 2):  # line 1 is the CSV header
            if isinstance(row, Skip):
                yield row
                continue
            video, caption = (row.get("video") or "").strip(), (row.get("caption") or "").strip()
            if not video or not caption:
                yield Skip(f"{path.name}:{number}", "bad_row", "missing 'video' or 'caption'")
                continue
            yield Record(video, NAME, "video", {"caption": caption}, video=index.find(video),
                         meta={"video_id": Path(video).stem})
