"""Test helpers for the data_prep tests: tiny mp4 clips whose frames tell their own timestamp, image files,
and reading shard sets back with the loader's own schema and frame decoding."""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from data_prep.scenes import COLOURS, encode_mp4
from fovlm.data.frames import sample_frames
from fovlm.data.schema import parse_sample

# A clip's frame at time t has grey level LEVEL0 + LEVEL_PER_S * t, so a decoded frame's mean tells when
# it was taken (to about 1 s after H.264, 1/2.4 s per grey level).
LEVEL0, LEVEL_PER_S = 5.0, 2.4


def clip_bytes(seconds: float, fps: int = 2, size: tuple[int, int] = (64, 48)) -> bytes:
    """An mp4 of ``seconds`` at ``fps`` whose frame i (time (i + 0.5) / fps) is grey level 5 + 2.4 t."""
    n = max(1, round(seconds * fps))
    w, h = size
    levels = LEVEL0 + LEVEL_PER_S * (np.arange(n) + 0.5) / fps  # [n]
    frames = np.broadcast_to(np.clip(levels, 0, 255).astype(np.uint8)[:, None, None, None], (n, h, w, 3))
    return encode_mp4(np.ascontiguousarray(frames), fps)


def frame_time(frame: np.ndarray) -> float:
    """The timestamp a frame of :func:`clip_bytes` shows."""
    return (float(frame.mean()) - LEVEL0) / LEVEL_PER_S


def write_clip(path: Path, seconds: float, fps: int = 2, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(clip_bytes(seconds, fps, size))
    return path


def image_file(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 40, 40),
               fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def image_bytes(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def read_shards(folder: Path) -> list[dict[str, Any]]:
    """Every sample of the shard set in ``folder``, parsed by the loader's schema and frame decoder.

    Each entry: ``key``, ``json`` (dict), ``sample`` (schema record), ``frames`` (uint8 [T, 3, S, S] or
    None), ``members`` (suffixes)."""
    out = []
    shards = sorted(glob.glob(str(folder / "*.tar")))
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        parsed = parse_sample(members["json"], key, list(members))
        frames = sample_frames(members, parsed.media, size=224, image_frames=1) if parsed.needs_frames else None
        out.append({"key": key, "json": json.loads(members["json"]), "sample": parsed, "frames": frames,
                    "members": sorted(members)})
    return out


# Reading synthetic shapes off decoded frames (uint8 [3, H, W]): backgrounds are near-grey, shapes saturated.


def object_pixels(frame: np.ndarray) -> np.ndarray:
    """Mask [H, W] of the saturated (shape) pixels of a uint8 [3, H, W] frame."""
    f = frame.astype(np.int32)
    return (f.max(0) - f.min(0)) > 90  # [H, W]


def object_colour(frame: np.ndarray) -> str:
    """The named colour closest to the mean of the frame's shape pixels."""
    mean = frame.reshape(3, -1)[:, object_pixels(frame).reshape(-1)].mean(1)
    return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - mean) ** 2)))


def object_shape(frame: np.ndarray) -> str:
    """circle, square or triangle, by how much of its bounding box the one shape in the frame fills."""
    mask = object_pixels(frame)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
