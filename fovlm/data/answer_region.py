"""Where a sample's answer is shown: the ``answer_region`` field of a shard's JSON (see :mod:`fovlm.data.schema`).

``{"box": [x0, y0, x1, y1], "from": seconds}`` is one box in fractions of the (square, centre-cropped) frame the
model sees, holding the answer from ``from`` seconds on; ``{"spread": [[x0, y0, x1, y1], ...], "from": seconds}``
lists the places an answer is spread over (the cells a count reads), in the order the look loss shares them out
over a frame's queries (:func:`fovlm.losses.look_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class AnswerRegion:
    """Where a sample's answer is shown, from ``start`` seconds on: one ``box`` = (x0, y0, x1, y1) in fractions
    of the frame, or, for an answer spread over several places, the boxes ``spread`` (``box`` is then None)."""

    box: Box | None
    start: float = 0.0
    spread: tuple[Box, ...] = ()

    @property
    def boxes(self) -> tuple[Box, ...]:
        """Every box of the region: the one ``box``, or the places of a spread answer in order."""
        return self.spread if self.box is None else (self.box,)

    def to_json(self) -> dict[str, Any]:
        if self.box is None:
            return {"spread": [list(b) for b in self.spread], "from": self.start}
        return {"box": list(self.box), "from": self.start}


def parse_answer_region(value: Any) -> AnswerRegion | None:
    """The region a shard's JSON ``answer_region`` describes (None for None); ValueError saying what is wrong."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or ("box" in value) == ("spread" in value):
        raise ValueError(f"expected {{'box': [x0, y0, x1, y1], 'from': seconds}} or "
                         f"{{'spread': [[x0, y0, x1, y1], ...], 'from': seconds}}, got {value!r}")
    start = value.get("from", 0.0)
    if isinstance(start, bool) or not isinstance(start, int | float) or not math.isfinite(start) or start < 0:
        raise ValueError(f"'from' must be a number of seconds >= 0, got {start!r}")
    if "box" in value:
        return AnswerRegion(_box(value["box"]), float(start))
    places = value["spread"]
    if not isinstance(places, list) or not places:
        raise ValueError(f"'spread' must be a non-empty list of boxes, got {places!r}")
    return AnswerRegion(None, float(start), tuple(_box(box) for box in places))


def _box(box: Any) -> Box:
    numbers = isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    if not numbers or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ValueError(f"expected a box [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, "
                         f"got {box!r}")
    return tuple(float(v) for v in box)  # type: ignore[return-value]
