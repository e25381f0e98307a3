"""Synthetic scenes: coloured shapes moving over textured backgrounds, rendered to RGB arrays and encoded to
real ``.mp4`` files with PyAV.

A :class:`Scene` is a plain description (background, shapes with colour, size, start position and
direction of motion, duration); :func:`render_scene` turns it into frames and :func:`encode_mp4` into the
bytes of an H.264 (or MPEG-4 part 2, where the PyAV build lacks libx264) video. Rendering is a pure function
of the scene, so a seeded generator gives the same videos on every machine. The generated videos are then
read back through the same decord path as any downloaded dataset (:mod:`data_prep.media`).

Design for learnability: colours are far apart in hue and saturated, the background is a low-contrast
texture (so it never competes with the object), and an object moves across a large part of the frame
over the clip, so that 1 FPS sampling shows its direction of motion in every pair of consecutive frames.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {  # unit motion (dx, dy) in image coordinates (y points down)
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
TEXTURES: tuple[str, ...] = ("stripes", "checks", "noise", "waves")


@dataclass(frozen=True)
class Shape:
    """One moving shape. Positions and size are fractions of the frame height (``size``: radius / half side)
    and of the frame (``x``, ``y``: centre at time 0); ``travel`` is the distance moved over the whole clip as
    a fraction of the frame's width (horizontal motion) or height (vertical)."""

    shape: str
    colour: str
    x: float
    y: float
    size: float
    direction: str
    travel: float


@dataclass(frozen=True)
class Scene:
    """A clip: ``duration`` seconds at ``fps`` frames per second, ``width x height`` pixels."""

    shapes: tuple[Shape, ...]
    texture: str
    background: tuple[int, int, int]
    duration: float
    fps: int = 8
    width: int = 160
    height: int = 120
    texture_seed: int = 0


def background_image(
    texture: str, base: tuple[int, int, int], seed: int, width: int, height: int
) -> np.ndarray:
    """A static textured background, float32 [H, W, 3] in 0..255, contrast +-10 around the ``base`` colour."""
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # [H, W] each
    rng = np.random.default_rng(seed)
    # Smooth (band-limited) patterns: visible texture that JPEG stores cheaply and that never has edges as
    # sharp as an object's.
    if texture == "stripes":
        angle = rng.uniform(0, np.pi)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(3.0, 6.0))
    elif texture == "checks":
        cell = rng.uniform(6.0, 12.0)
        pattern = np.sin(np.pi * xx / cell) * np.sin(np.pi * yy / cell)
    elif texture == "noise":
        coarse = rng.uniform(-1, 1, size=(h // 16 + 2, w // 16 + 2)).astype(np.float32)
        gy, gx = yy / 16.0, xx / 16.0  # bilinear upsampling of the coarse grid
        y0, x0 = gy.astype(int), gx.astype(int)
        fy, fx = gy - y0, gx - x0
        top = coarse[y0, x0] * (1 - fx) + coarse[y0, x0 + 1] * fx
        bottom = coarse[y0 + 1, x0] * (1 - fx) + coarse[y0 + 1, x0 + 1] * fx
        pattern = top * (1 - fy) + bottom * fy
    elif texture == "waves":
        pattern = np.sin(xx / rng.uniform(4, 9)) * np.cos(yy / rng.uniform(4, 9))
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    return np.asarray(base, np.float32)[None, None, :] + 10.0 * pattern[..., None]  # [H, W, 3]


def shape_centre(shape: Shape, t: float, duration: float, width: int, height: int) -> tuple[float, float]:
    """Pixel centre of ``shape`` at time ``t`` (linear motion over the clip)."""
    dx, dy = DIRECTIONS[shape.direction]
    frac = t / duration if duration > 0 else 0.0
    cx = shape.x * width + dx * shape.travel * width * frac
    cy = shape.y * height + dy * shape.travel * height * frac
    return cx, cy


def shape_mask(shape: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Pixels [H, W] (bool) covered by ``shape`` centred at (cx, cy) with radius / half side ``r`` pixels."""
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "triangle":
        # Apex up; the half-width grows linearly from the apex (cy - r) to the base (cy + r).
        rel = (yy - (cy - r)) / (2 * r)
        return (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene) -> np.ndarray:
    """All frames of ``scene`` as uint8 [N, H, W, 3], N = round(duration * fps) (at least 1)."""
    n = max(1, round(scene.duration * scene.fps))
    background = background_image(scene.texture, scene.background, scene.texture_seed, scene.width, scene.height)
    yy, xx = np.mgrid[0 : scene.height, 0 : scene.width].astype(np.float32)  # [H, W]
    frames = np.empty((n, scene.height, scene.width, 3), np.uint8)  # [N, H, W, 3]
    for i in range(n):
        t = (i + 0.5) / scene.fps
        frame = background.copy()
        for shape in scene.shapes:
            cx, cy = shape_centre(shape, t, scene.duration, scene.width, scene.height)
            frame[shape_mask(shape.shape, cx, cy, shape.size * scene.height, xx, yy)] = COLOURS[shape.colour]
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def video_codec() -> str:
    """libx264 where the PyAV build has it (its wheels do), else the always-built-in MPEG-4 part 2."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> the planar yuv420p layout PyAV takes ([H * 3 / 2, W]: Y, then U, then V), by the
    BT.601 limited-range matrix that decoders assume for untagged H.264.

    Done here rather than by libswscale, whose SIMD paths depend on the buffer's memory alignment and so
    gave different bytes for the same frames from run to run."""
    h, w, _ = rgb.shape
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0  # [H, W]
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    # 2x2 chroma averaging: [H/2, W/2] each.
    u = u.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    v = v.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    planes = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)  # [H * 3/2, W]


def encode_mp4(frames: np.ndarray, fps: int, codec: str | None = None, crf: int = 27) -> bytes:
    """Encode uint8 RGB frames [N, H, W, 3] (H and W even) to the bytes of an ``.mp4`` at ``fps``."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    n, h, w, _ = frames.shape
    if n < 1 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even sizes for yuv420p, got {n} frames of {w}x{h}")
    codec = codec or video_codec()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # A seeded dataset must be the same bytes on every run: one encoder thread (the shard writers
        # parallelise across videos anyway) and no rate-control lookahead, whose macroblock-tree pass gave
        # run-to-run differences for some clips even single-threaded.
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "rc-lookahead": "0"}
        else:
            stream.bit_rate = 400_000
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(array), format="yuv420p")
            frame.pts = i  # explicit timestamps in the stream's 1/fps time base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buffer.getvalue()
