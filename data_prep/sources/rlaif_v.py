"""RLAIF-V (``openbmb/RLAIF-V-Dataset``): image preference pairs for DPO (stage 3).

Published layout: ``RLAIF-V-Dataset_XXX.parquet`` files with columns ``ds_name``, ``image`` (``{"bytes",
"path"}``), ``question``, ``chosen``, ``rejected``, ``origin_dataset``, ``origin_split``, ``idx``,
``image_path``; a ``.jsonl`` export with the same columns is read too. ``input``: a file or a folder of
them. Each row becomes a preference sample: ``messages`` = the user question, ``chosen`` / ``rejected``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record, annotation_files, image_ref, read_rows
from data_prep.writer import Skip

NAME = "rlaif_v"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    for path in annotation_files(input):
        base = media or path.parent
        for number, row in enumerate(read_rows(path)):
            if isinstance(row, Skip):
                yield row
                continue
            item = str(row.get("idx") if row.get("idx") is not None else f"{path.stem}[{number}]")
            question, chosen, rejected = row.get("question"), row.get("chosen"), row.get("rejected")
            if not all(isinstance(t, str) and t.strip() for t in (question, chosen, rejected)):
                yield Skip(item, "bad_row", "missing 'question', 'chosen' or 'rejected' text")
                continue
            try:
                image = image_ref(row.get("image") or row.get("image_path"), base)
            except ValueError as err:
                yield Skip(item, "bad_row", str(err))
                continue
            text = {"messages": [{"role": "user", "content": question.strip()}], "chosen": chosen.strip(),
                    "rejected": rejected.strip()}
            meta = {k: row[k] for k in ("ds_name", "origin_dataset") if isinstance(row.get(k), str)}
            yield Record(item, NAME, "image", text, images=(image,), meta=meta)
