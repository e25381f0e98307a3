"""LLaVA-Video-178K (``lmms-lab/LLaVA-Video-178K``), e.g. its ``0_30_s_youtube_v0_1`` subset ("LLaVA
YouTube").

Published layout: one folder per subset holding ``*_cap_processed.json`` (captions), ``*_oe_qa_processed.json``
(open-ended QA) and ``*_mc_qa_processed.json`` (multiple-choice QA), each a list of LLaVA-style ``{"id",
"video", "conversations", "data_source"}`` (see :mod:`data_prep.sources._llava`), and ``*.tar.gz`` video
archives that extract to the relative ``video`` paths, below the subset folder.

``input``: the subset folder (every ``*processed.json`` in it) or one JSON; ``media``: default the subset
folder. The fVLM original joined all answers of a video into one string (docs/differences.md#data); here
each entry is its own sample and multi-turn QA keeps its turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record
from data_prep.sources._llava import llava_records
from data_prep.writer import Skip

NAME = "llava_video"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    return llava_records(NAME, input, media, "*processed.json")
