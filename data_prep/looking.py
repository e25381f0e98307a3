"""Question families that need looking: the answer is a detail of one cell, and only an earlier frame says which.

Each clip is a :class:`~data_prep.cue_scenes.CueScene`: a white ring marks one cell of a grid during the first
second, then small shapes fill the cells. The questions ask about "the shape where the ring was":

| category | question | answer |
|---|---|---|
| ``look_colour`` | What colour is the shape where the ring was? | its colour ("Red.") |
| ``look_shape`` | Which shape is where the ring was? | its shape ("A circle.") |

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
LOOK_CATEGORIES = tuple(LOOK_QUESTIONS)


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
    """Every answer a category can have (colour names or shape names)."""
    if category == "look_colour":
        return list(COLOURS)
    if category == "look_shape":
        return list(SHAPES)
    raise ValueError(f"unknown category {category!r}; expected one of {LOOK_CATEGORIES}")


def answer_text(category: str, value: str) -> str:
    """The short answer for a value: "Red." or "A circle."."""
    return f"{value.capitalize()}." if category == "look_colour" else f"A {value}."


def scene_answer(scene: CueScene, category: str) -> str:
    """The answer to ``category``'s question about ``scene``: what the ringed cell shows after the cue."""
    target = scene.target
    return answer_text(category, target.colour if category == "look_colour" else target.shape)


def cue_scene(rng: random.Random, config: LookConfig, category: str, value: str, distractors: bool = True) -> CueScene:
    """A clip whose ringed cell shows ``value`` (a colour or a shape, by ``category``).

    Every cell's colour differs while there are colours enough (beyond six cells the other cells repeat
    colours, never the ringed cell's); for ``look_shape`` every shape appears in the grid when it has room, so
    the shapes on screen do not give the answer away."""
    cells = config.grid * config.grid
    cue = rng.randrange(cells)
    target = value if category == "look_colour" else rng.choice(list(COLOURS))
    others = [c for c in COLOURS if c != target]
    colours = rng.sample(others, cells - 1) if cells - 1 <= len(others) else [rng.choice(others) for _ in range(cells - 1)]
    colours.insert(cue, target)
    shapes = [rng.choice(SHAPES) for _ in range(cells)]
    if category == "look_shape":
        shapes[cue] = value
        spare = [i for i in range(cells) if i != cue]
        missing = [s for s in SHAPES if s != value]
        for index, shape in zip(rng.sample(spare, min(len(spare), len(missing))), missing, strict=False):
            shapes[index] = shape
    items = tuple(
        CellItem(shapes[i], colours[i]) if distractors or i == cue else None for i in range(cells)
    )
    tint = [rng.randint(-15, 15) for _ in range(3)]
    grey = rng.randint(100, 160)
    return CueScene(
        rows=config.grid, cols=config.grid, cue=cue, items=items, texture=rng.choice(TEXTURES),
        background=tuple(grey + t for t in tint),  # type: ignore[arg-type]
        texture_seed=rng.randrange(2**31), duration=1.0 + config.reads, cue_seconds=1.0, fps=config.clip_fps,
        width=config.width, height=config.width, item_size=config.item_size,
    )


def balanced_scenes(
    rng: random.Random, config: LookConfig, n: int, distractors: bool = True,
    categories: Sequence[str] = LOOK_CATEGORIES,
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
    else:
        on_screen = [i.colour for k, i in enumerate(scene.items) if i is not None and k != scene.cue]
        rng.shuffle(on_screen)
        rest = [c for c in COLOURS if c != scene.target.colour and c not in on_screen]
        rng.shuffle(rest)
        options = [right] + [answer_text(category, c) for c in (on_screen + rest)[: count - 1]]
    rng.shuffle(options)
    return options


def wrong_answer(rng: random.Random, scene: CueScene, category: str) -> str:
    """A wrong answer a model that does not look would give: another cell's value when there is one."""
    right = scene_answer(scene, category)
    seen = [answer_text(category, i.colour if category == "look_colour" else i.shape)
            for k, i in enumerate(scene.items) if i is not None and k != scene.cue]
    pool = [a for a in seen if a != right] or [answer_text(category, v) for v in values(category)
                                                if answer_text(category, v) != right]
    return rng.choice(pool)


def answer_region(scene: CueScene) -> dict[str, object]:
    """The shard JSON's ``answer_region``: the ringed cell's box in fractions of the frame, from the end of the
    cue on (see :mod:`fovlm.data.schema`)."""
    x0, y0, x1, y1 = cell_box(scene.rows, scene.cols, scene.cue, 1.0, 1.0)
    return {"box": [round(v, 6) for v in (x0, y0, x1, y1)], "from": scene.cue_seconds}
