"""Cue-then-look scenes: one cell of a grid is marked at the start of a clip, then small shapes fill the cells.

A :class:`CueScene` is a grid of ``rows x cols`` cells over a textured background. During the first
``cue_seconds`` only a white ring in the cue cell is visible; after that the ring is gone and each cell holds a
small shape (or nothing). A question about "the shape where the ring was" can then only be answered by a model
that keeps where the ring was and reads that one cell of a later frame: no single frame holds both the place
and the answer, and the answer is a detail of one cell among distractors of other colours and shapes.

Rendering is a pure function of the scene (:func:`render_cue_scene`), so the seeded generator in
:mod:`data_prep.looking` gives the same clips everywhere; :func:`cell_box` gives the pixel box of a cell, which
is also where the attention share of :mod:`fovlm.eval.looking` counts a query's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.scenes import COLOURS, SHAPES, TEXTURES, background_image, shape_mask

MARK_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class CellItem:
    """The shape that fills a cell after the cue."""

    shape: str
    colour: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")


@dataclass(frozen=True)
class CueScene:
    """A cue-then-look clip.

    Attributes:
        rows, cols: the grid (cells are numbered row-major from the top left).
        cue: the cell marked by the ring during the first ``cue_seconds``.
        items: one entry per cell, the shape shown there after the cue (None: the cell stays empty).
        texture, background, texture_seed: the background, as in :func:`data_prep.scenes.background_image`.
        duration: clip length in seconds.
        cue_seconds: how long the ring is shown (the shapes appear right after).
        fps, width, height: the clip's frame rate and size in pixels.
        item_size: a shape's radius (half side) as a fraction of the cell's smaller side.
        ring: show the ring during the first ``cue_seconds`` (False: the shapes from the start, and the cue cell is
            only where the question points, e.g. by naming its row and column).
    """

    rows: int
    cols: int
    cue: int
    items: tuple[CellItem | None, ...]
    texture: str
    background: tuple[int, int, int]
    texture_seed: int = 0
    duration: float = 3.0
    cue_seconds: float = 1.0
    fps: int = 8
    width: int = 112
    height: int = 112
    item_size: float = 0.3
    ring: bool = True

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"a grid needs at least one row and column, got {self.rows} x {self.cols}")
        if len(self.items) != self.rows * self.cols:
            raise ValueError(f"{len(self.items)} items for a {self.rows} x {self.cols} grid")
        if not 0 <= self.cue < len(self.items):
            raise ValueError(f"cue cell {self.cue} outside the {len(self.items)} cells")
        if self.items[self.cue] is None:
            raise ValueError("the cue cell must hold a shape: it is what the question asks about")
        if not 0 < self.cue_seconds < self.duration:
            raise ValueError(f"need 0 < cue_seconds < duration, got {self.cue_seconds} and {self.duration}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")

    @property
    def target(self) -> CellItem:
        """The shape in the cue cell."""
        item = self.items[self.cue]
        assert item is not None
        return item


def cell_box(rows: int, cols: int, index: int, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box ``(x0, y0, x1, y1)`` of cell ``index`` (row-major) of a ``rows x cols`` grid over the frame."""
    row, col = divmod(index, cols)
    return col * width / cols, row * height / rows, (col + 1) * width / cols, (row + 1) * height / rows


def _ring(cx: float, cy: float, outer: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    distance = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return (distance <= outer) & (distance >= 0.6 * outer)


def render_cue_scene(scene: CueScene) -> np.ndarray:
    """All frames of ``scene`` as uint8 [N, H, W, 3], N = round(duration * fps): the ring in the cue cell
    while ``t < cue_seconds`` (when ``ring``), the shapes afterwards."""
    n = max(1, round(scene.duration * scene.fps))
    h, w = scene.height, scene.width
    background = background_image(scene.texture, scene.background, scene.texture_seed, w, h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # [H, W]
    boxes = [cell_box(scene.rows, scene.cols, i, w, h) for i in range(len(scene.items))]
    cell = min(w / scene.cols, h / scene.rows)
    cue_frame = background.copy()
    x0, y0, x1, y1 = boxes[scene.cue]
    cue_frame[_ring((x0 + x1) / 2, (y0 + y1) / 2, 0.42 * cell, xx, yy)] = MARK_COLOUR
    items_frame = background.copy()
    for item, (x0, y0, x1, y1) in zip(scene.items, boxes, strict=True):
        if item is not None:
            mask = shape_mask(item.shape, (x0 + x1) / 2, (y0 + y1) / 2, scene.item_size * cell, xx, yy)
            items_frame[mask] = COLOURS[item.colour]
    cue_u8, items_u8 = (np.clip(f, 0, 255).astype(np.uint8) for f in (cue_frame, items_frame))
    frames = np.empty((n, h, w, 3), np.uint8)  # [N, H, W, 3]
    for i in range(n):
        frames[i] = cue_u8 if scene.ring and (i + 0.5) / scene.fps < scene.cue_seconds else items_u8
    return frames
