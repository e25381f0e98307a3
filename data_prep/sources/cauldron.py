"""The Cauldron (``HuggingFaceM4/the_cauldron``): 50 image instruction subsets for stage 2.

Published layout: one folder per subset (``ai2d/``, ``vqav2/``, ...) of ``train-XXXXX-of-YYYYY.parquet``
files with columns ``images`` (a list of ``{"bytes", "path"}``) and ``texts`` (a list of ``{"user",
"assistant", "source"}``: the conversation's turns). A ``.jsonl`` export with the same columns is read too
(image ``bytes`` as base64 text, or a ``path`` relative to the file).

``input``: the dataset folder (every subset) or one subset folder or file; the subset name is the parent
folder's name, and ``source`` is ``cauldron/{subset}``. Every turn of ``texts`` is kept (the fVLM
original kept only the last one) and every image is kept: one image is one frame; several become one grid image or a
frame sequence (``--multi-image``, see :mod:`data_prep.media`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.records import Record, annotation_files, image_ref, read_rows
from data_prep.writer import Skip

NAME = "cauldron"


def records(input: Path, media: Path | None = None) -> Iterator[Record | Skip]:
    for path in annotation_files(input):
        subset = path.parent.name
        base = media or path.parent
        for number, row in enumerate(read_rows(path)):
            item = f"{subset}/{path.stem}[{number}]"
            if isinstance(row, Skip):
                yield row
                continue
            texts, images = row.get("texts"), row.get("images")
            try:
                if not isinstance(texts, list) or not texts:
                    raise ValueError("'texts' is not a non-empty list")
                messages = []
                for turn in texts:
                    user, assistant = turn.get("user"), turn.get("assistant")
                    if not (isinstance(user, str) and isinstance(assistant, str)):
                        raise ValueError("a turn without 'user' and 'assistant' text")
                    messages += [{"role": "user", "content": user.strip()},
                                 {"role": "assistant", "content": assistant.strip()}]
                if not isinstance(images, list) or not images:
                    raise ValueError("'images' is not a non-empty list")
                refs = tuple(image_ref(i, base) for i in images)
            except (ValueError, AttributeError) as err:
                yield Skip(item, "bad_row", str(err))
                continue
            yield Record(item, f"{NAME}/{subset}", "image", {"messages": messages}, images=refs)
