"""MLVU (``MLVU/MVLU``): long-video understanding, multiple-choice part.

Published layout: ``MLVU/json/{N}_{task}.json`` (``1_plotQA.json``, ``2_needle.json``, ...), each a list of
``{"video", "duration", "question", "candidates", "answer", "question_type"}`` (answer = the right
candidate's text); videos under ``MLVU/video/{N}_{task}/{video}``.

``input``: the ``MLVU`` folder (with ``json/``) or one task JSON; ``media``: default ``video/`` beside
``json/``. ``category`` is ``question_type``. Long videos give 64 frames spread over the whole video.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record
from data_prep.sources._mcq import mcq_records
from data_prep.writer import Skip

NAME = "mlvu"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    return mcq_records(NAME, input, media, lambda task: task)
