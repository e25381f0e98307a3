"""WebVid (``TempoFunk/webvid-10M`` metadata; the videos must be downloaded, most URLs are dead).

Published layout: ``results_10M_train.csv`` / ``results_2M_val.csv`` with columns ``videoid``,
``contentUrl``, ``duration``, ``page_dir``, ``name`` (the caption).

Assumed video layout (what video downloaders write): ``{media}/{videoid}.mp4`` or
``{media}/{page_dir}/{videoid}.mp4``. ``input``: the CSV, or a folder (every ``*.csv`` below it);
``media``: default ``videos/`` in that folder or beside the CSV, else the folder itself. Rows whose video
was not downloaded are skipped as ``missing_file`` and listed in the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import MediaIndex, Record, annotation_files, read_rows
from data_prep.sources.openvid import default_media
from data_prep.writer import Skip

NAME = "webvid"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    root = media or default_media(input, "videos")
    index = MediaIndex(root)
    for table in annotation_files(input, "*.csv"):
        for number, row in enumerate(read_rows(table), 2):
            if isinstance(row, Skip):
                yield row
                continue
            videoid, caption = str(row.get("videoid") or "").strip(), (row.get("name") or "").strip()
            if not videoid or not caption:
                yield Skip(f"{table.name}:{number}", "bad_row", "missing 'videoid' or 'name'")
                continue
            page_dir = (row.get("page_dir") or "").strip()
            nested = root / page_dir / f"{videoid}.mp4"
            path = str(nested) if page_dir and nested.is_file() else index.find(f"{videoid}.mp4")
            yield Record(videoid, NAME, "video", {"caption": caption}, video=path, meta={"video_id": videoid})
