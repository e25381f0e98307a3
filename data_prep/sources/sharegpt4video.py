"""ShareGPT4Video (``ShareGPT4Video/ShareGPT4Video``): detailed video captions as instruction data.

Assumed layout: the instruction-tuning JSON the project publishes in LLaVA format (e.g.
``sharegpt4video_mix181k_vqa-153k_share-cap-28k.json``, its video entries), a list of ``{"id", "video",
"conversations"}`` (see :mod:`data_prep.sources._llava`); the videos from its ``zip_folder`` archives
extracted under ``media`` (default: the JSON's folder), looked up by relative path, then by file name.
Entries without a ``video`` (image-only rows of the mix) are skipped as ``bad_row``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record
from data_prep.sources._llava import llava_records
from data_prep.writer import Skip

NAME = "sharegpt4video"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    return llava_records(NAME, input, media)
