"""MVBench (``OpenGVLab/MVBench``): 20 temporal video tasks, 4-way-or-fewer multiple choice.

Published layout: ``json/{task}.json`` (e.g. ``action_sequence.json``), each a list of ``{"video",
"question", "candidates", "answer"}`` (answer = the right candidate's text), plus ``start`` / ``end`` in
seconds for the tasks on a segment of a longer video; videos under ``video/{dataset}/...`` (one folder
per origin dataset: ``star/Charades_v1_480/``, ``clevrer/video_validation/``, ...).

``input``: the MVBench folder (with ``json/``) or one task JSON; ``media``: default ``video/`` beside
``json/``; a video is found by file name below it. Samples: ``question``, ``options`` (the candidates),
``answer`` (index), ``category`` (the task); a segment is sampled by the same 1 FPS rule within
``[start, end]``. Tasks stored as frame folders or GIFs that decord and PyAV cannot open are skipped as
``unreadable_video`` / ``missing_file`` and listed in the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record
from data_prep.sources._mcq import mcq_records
from data_prep.writer import Skip

NAME = "mvbench"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    return mcq_records(NAME, input, media, lambda task: ".")
