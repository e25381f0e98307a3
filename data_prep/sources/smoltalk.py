"""SmolTalk (``HuggingFaceTB/smoltalk``): text-only chat for text retention in every stage.

Published layout: ``data/{config}/train-XXXXX-of-YYYYY.parquet`` (``all`` or one of its sources) with
columns ``messages`` (a list of ``{"role", "content"}``) and ``source``; a ``.jsonl`` export with the same
columns is read too. ``input``: a file or a folder of them. Whole conversations are kept (the fVLM
original collapsed them to their last user / assistant pair), system turns included; ``media`` is ``text``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record, annotation_files, read_rows
from data_prep.writer import Skip

NAME = "smoltalk"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    for path in annotation_files(input):
        for number, row in enumerate(read_rows(path)):
            if isinstance(row, Skip):
                yield row
                continue
            item = f"{path.stem}[{number}]"
            messages = row.get("messages")
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                yield Skip(item, "bad_row", "'messages' is not a list of {role, content}")
                continue
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            while turns and turns[-1]["role"] != "assistant":  # nothing to learn after the last answer
                turns.pop()
            meta = {"subset": row["source"]} if isinstance(row.get("source"), str) else {}
            yield Record(item, NAME, "text", {"messages": turns}, meta=meta)
