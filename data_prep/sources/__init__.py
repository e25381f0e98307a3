"""One module per dataset; each reads that dataset's published layout (its docstring says which) and yields
:class:`data_prep.records.Record` items (or :class:`data_prep.writer.Skip` for bad rows).

Every module has ``records(input: Path, media: Path | None) -> Iterator[Record | Skip]``: ``input`` is the
annotation file or the dataset's folder, ``media`` where the videos / images were extracted (each module
has a default relative to ``input``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SOURCES: tuple[str, ...] = (
    "openvid",
    "webvid",
    "vript",
    "sharegpt4video",
    "vista",
    "llava_video",
    "cauldron",
    "smoltalk",
    "rlaif_v",
    "mvbench",
    "videomme",
    "mlvu",
)


def source_module(name: str) -> ModuleType:
    """The module of source ``name`` (one of :data:`SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")
    return importlib.import_module(f"data_prep.sources.{name}")
