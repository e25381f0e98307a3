"""VISTA-400K (``TIGER-Lab/VISTA-400K``): synthetic long-video question answering (12 task types).

Published layout: one JSON per task subset, each a list of LLaVA-style ``{"id", "video", "conversations"}``
(see :mod:`data_prep.sources._llava`); the videos ship as tar parts that extract to the relative paths the
entries name. ``input``: a JSON file or the folder of them; ``media``: where the videos were extracted
(default: the JSON's folder). Multi-turn conversations stay multi-turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record
from data_prep.sources._llava import llava_records
from data_prep.writer import Skip

NAME = "vista"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    return llava_records(NAME, input, media)
