"""Question families that need looking: the answer is a detail of one cell, and only an earlier frame says which.

Each clip is a :class:`~data_prep.cue_scenes.CueScene`: a white ring marks one cell of a grid during the first
second, then small shapes fill the cells. The questions ask about "the shape where the ring was":

| category | question | answer |
|---|---|---|
| ``look_colour`` | What colour is the shape where the ring was? | its colour ("Red.") |
| ``look_shape`` | Which shape is where the ring was? | its shape ("A circle.") |

Two more families have no ring: the question itself says where to look, or the answer is spread over the grid.

| category | question | answer |
|---|---|---|
| ``name_colour`` | What colour is the shape in row 2, column 3? | that cell's colour ("Red.") |
| ``count_colour`` | How many shapes are red? | how many cells hold that colour ("Two.", one to four) |

Only a model that reads the question before it looks can know which cell a ``name_colour`` question needs (the
cell's position is in the text alone); a ``count_colour`` answer is a summary of several cells, which more tokens
per frame should hold better than one.

A single static token per frame cannot hold the answer: the ring's frame shows no shape, and a later frame holds
a shape in every cell, of other colours and shapes (no other cell has the ringed cell's colour; with three or
more cells every shape appears). A multiple-choice question's wrong options are the colours of the other cells, so knowing
which colours are on screen does not help either. Answers are balanced over their values.

``distractors=False`` gives the warm-up variant: only the ringed cell gets a shape, so one token per frame
already holds the answer. Training on it first teaches the language model to read the answer from the visual
tokens before the full grid asks the query to find the cell.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from data_prep.cue_scenes import CellItem, CueScene, cell_box
from data_prep.scenes import COLOURS, SHAPES, TEXTURES

LOOK_QUESTIONS = {
    "look_colour": "What colour is the shape where the ring was?",
    "look_shape": "Which shape is where the ring was?",
}
COUNT_WORDS = ("One", "Two", "Three", "Four")
LOOK_CATEGORIES = (*LOOK_QUESTIONS, "name_colour", "count_colour")
RINGED = frozenset(LOOK_QUESTIONS)
"""The families whose clips mark the cell with a ring; the others show the shapes from the first frame."""


@dataclass(frozen=True)
class LookConfig:
    """How cue-then-look clips are drawn.

    Args:
        grid: cells per side (grid x grid cells).
        reads: seconds (so frames at 1 FPS) of shapes after the one-second cue.
        width: frame width and height in pixels.
        clip_fps: frame rate the clips are encoded at.
        item_size: a shape's radius as a fraction of its cell's side.
    """

    grid: int = 2
    reads: int = 1
    width: int = 112
    clip_fps: int = 8
    item_size: float = 0.3

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be at least 1, got {self.grid}")
        if self.reads < 1:
            raise ValueError(f"reads must be at least 1, got {self.reads}")
        if self.width % 2:
            raise ValueError(f"width must be even (yuv420p), got {self.width}")


def values(category: str) -> list[str]:
    """Every answer a category can have (colour names, shape names or counts)."""
    if category in ("look_colour", "name_colour"):
        return list(COLOURS)
    if category == "look_shape":
        return list(SHAPES)
    if category == "count_colour":
        return list(COUNT_WORDS)
    raise ValueError(f"unknown category {category!r}; expected one of {LOOK_CATEGORIES}")


def answer_text(category: str, value: str) -> str:
    """The short answer for a value: "Red.", "A circle." or "Two."."""
    return f"A {value}." if category == "look_shape" else f"{value.capitalize()}."


def question_text(category: str, scene: CueScene) -> str:
    """The question of ``category`` about ``scene``."""
    if category in LOOK_QUESTIONS:
        return LOOK_QUESTIONS[category]
    if category == "name_colour":
        row, col = divmod(scene.cue, scene.cols)
        return f"What colour is the shape in row {row + 1}, column {col + 1}?"
    if category == "count_colour":
        return f"How many shapes are {scene.target.colour}?"
    raise ValueError(f"unknown category {category!r}; expected one of {LOOK_CATEGORIES}")


def _value_of(category: str, scene: CueScene, item) -> str:
    return item.shape if category == "look_shape" else item.colour


def scene_answer(scene: CueScene, category: str) -> str:
    """The answer to ``category``'s question about ``scene``: what the cue cell shows after the cue, or for
    ``count_colour`` how many cells hold the cue cell's colour."""
    target = scene.target
    if category == "count_colour":
        count = sum(item is not None and item.colour == target.colour for item in scene.items)
        return answer_text(category, COUNT_WORDS[count - 1])
    return answer_text(category, _value_of(category, scene, target))


def cue_scene(rng: random.Random, config: LookConfig, category: str, value: str, distractors: bool = True) -> CueScene:
    """A clip whose ringed cell shows ``value`` (a colour or a shape, by ``category``).

    Every cell's colour differs while there are colours enough (beyond six cells the other cells repeat
    colours, never the ringed cell's); for ``look_shape`` every shape appears in the grid when it has room, so
    the shapes on screen do not give the answer away."""
    cells = config.grid * config.grid
    cue = rng.randrange(cells)
    target = value if category in ("look_colour", "name_colour") else rng.choice(list(COLOURS))
    others = [c for c in COLOURS if c != target]
    colours = rng.sample(others, cells - 1) if cells - 1 <= len(others) else [rng.choice(others) for _ in range(cells - 1)]
    colours.insert(cue, target)
    if category == "count_colour":  # value more cells than the cue cell share its colour
        extra = COUNT_WORDS.index(value)
        for index in rng.sample([i for i in range(cells) if i != cue], min(extra, cells - 1)):
            colours[index] = target
    shapes = [rng.choice(SHAPES) for _ in range(cells)]
    if category == "look_shape":
        shapes[cue] = value
        spare = [i for i in range(cells) if i != cue]
        missing = [s for s in SHAPES if s != value]
        for index, shape in zip(rng.sample(spare, min(len(spare), len(missing))), missing, strict=False):
            shapes[index] = shape
    kept = {cue} | ({i for i in range(cells) if colours[i] == target} if category == "count_colour" else set())
    items = tuple(
        CellItem(shapes[i], colours[i]) if distractors or i in kept else None for i in range(cells)
    )
    tint = [rng.randint(-15, 15) for _ in range(3)]
    grey = rng.randint(100, 160)
    return CueScene(
        rows=config.grid, cols=config.grid, cue=cue, items=items, texture=rng.choice(TEXTURES),
        background=tuple(grey + t for t in tint),  # type: ignore[arg-type]
        texture_seed=rng.randrange(2**31), duration=1.0 + config.reads, cue_seconds=1.0, fps=config.clip_fps,
        width=config.width, height=config.width, item_size=config.item_size, ring=category in RINGED,
    )


def balanced_scenes(
    rng: random.Random, config: LookConfig, n: int, distractors: bool = True,
    categories: Sequence[str] = tuple(LOOK_QUESTIONS),
) -> list[tuple[str, CueScene]]:
    """``n`` (category, scene) pairs: categories in turn, each category's answers cycling through its values."""
    seen = dict.fromkeys(categories, 0)
    out = []
    for i in range(n):
        category = categories[i % len(categories)]
        value = values(category)[seen[category] % len(values(category))]
        seen[category] += 1
        out.append((category, cue_scene(rng, config, category, value, distractors)))
    return out


def choice_options(rng: random.Random, scene: CueScene, category: str, count: int = 4) -> list[str]:
    """Shuffled multiple-choice options: the right answer first among the other cells' values, then others."""
    right = scene_answer(scene, category)
    if category == "look_shape":
        options = [answer_text(category, s) for s in SHAPES]
    elif category == "count_colour":
        options = [answer_text(category, w) for w in COUNT_WORDS]
    else:
        on_screen = list(dict.fromkeys(
            i.colour for k, i in enumerate(scene.items) if i is not None and i.colour != scene.target.colour))
        rng.shuffle(on_screen)
        rest = [c for c in COLOURS if c != scene.target.colour and c not in on_screen]
        rng.shuffle(rest)
        options = [right] + [answer_text(category, c) for c in (on_screen + rest)[: count - 1]]
    rng.shuffle(options)
    return options


def wrong_answer(rng: random.Random, scene: CueScene, category: str) -> str:
    """A wrong answer a model that does not look would give: another cell's value when there is one."""
    right = scene_answer(scene, category)
    seen = [answer_text(category, _value_of(category, scene, i))
            for k, i in enumerate(scene.items) if i is not None and k != scene.cue and category != "count_colour"]
    pool = [a for a in seen if a != right] or [answer_text(category, v) for v in values(category)
                                                if answer_text(category, v) != right]
    return rng.choice(pool)


def answer_region(scene: CueScene, category: str = "look_colour") -> dict[str, object]:
    """The shard JSON's ``answer_region`` (see :mod:`fovlm.data.schema`), in fractions of the frame, from the end
    of the cue on (the first frame when there is no ring): the cue cell's box, or for ``count_colour``, whose
    answer is spread over the grid, every cell's box in row-major order (``spread``)."""
    start = scene.cue_seconds if scene.ring else 0.0
    if category == "count_colour":
        cells = range(scene.rows * scene.cols)
        return {"spread": [_fractions(scene, cell) for cell in cells], "from": start}
    return {"box": _fractions(scene, scene.cue), "from": start}


def _fractions(scene: CueScene, cell: int) -> list[float]:
    return [round(v, 6) for v in cell_box(scene.rows, scene.cols, cell, 1.0, 1.0)]
