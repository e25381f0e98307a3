"""Shared reading of the multiple-choice benchmarks that publish ``json/{task}.json`` lists of
``{"video", "question", "candidates", "answer"}`` (MVBench, MLVU): the answer is the text of the right
candidate; the category is the task (the JSON's ``question_type`` where present, else the file's stem)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.records import (
    MediaIndex,
    Record,
    annotation_files,
    answer_index,
    strip_option_letter,
    video_rows,
)
from data_prep.writer import Skip


def mcq_text(row: dict[str, Any]) -> dict[str, Any]:
    """question / options / answer from a row with ``question``, ``candidates`` (or ``options``), ``answer``."""
    question = row.get("question")
    options = row.get("candidates", row.get("options"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no question")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError("fewer than 2 text options")
    return {"question": question.strip(), "options": [strip_option_letter(o) for o in options],
            "answer": answer_index(row.get("answer"), options)}


def mcq_records(name: str, input: Path, media: Path | None, video_folder) -> Iterator[Record | Skip]:
    """``video_folder(task) -> relative folder`` says where a task's videos live under the media root."""
    if input.is_dir():
        json_dir, root = (input / "json" if (input / "json").is_dir() else input), input
    else:
        json_dir, root = input, input.parent.parent  # .../json/{task}.json -> ...
    index = MediaIndex(media or root / "video")
    files = annotation_files(json_dir, "*.json")
    for entry in video_rows(files, "video", mcq_text, lambda path, number, _row: f"{path.stem}[{number}]"):
        if isinstance(entry, Skip):
            yield entry
            continue
        task, row, video, text = entry.path.stem, entry.row, entry.video, entry.text
        text["category"] = row.get("question_type") if isinstance(row.get("question_type"), str) else task
        meta: dict[str, Any] = {"video_id": Path(video).stem, "task": task}
        clip = None
        if isinstance(row.get("start"), int | float) and isinstance(row.get("end"), int | float):
            if row["end"] > row["start"]:
                clip = (float(row["start"]), float(row["end"]))
        yield Record(entry.item, name, "video", text, video=index.find(f"{video_folder(task)}/{video.strip()}"),
                     meta=meta, clip=clip)
