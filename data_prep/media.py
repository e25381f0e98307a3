"""Media conversion for the shard writers: a video file or image becomes the members of one sample.

Videos go through :func:`fovlm.data.frames.decode_video`, the same decord (fallback PyAV) path and the same
frame selection (:func:`fovlm.data.frames.select_frame_times`: 1 FPS, ``min(duration, 64)`` frames, 64
spread uniformly over longer videos) that the loader uses for ``KEY.mp4``; the frames are then stored as
JPEGs (``KEY.000.jpg`` ...), or the ``.mp4`` itself is kept (``keep_mp4``) after checking that it decodes.

Images: ``fit="crop"`` resizes to cover ``size x size`` and crops the centre (what the loader does, and
what the fVLM original did); ``fit="pad"`` resizes to fit inside and pads the borders with the ImageNet mean
colour (which the model sees as zero after normalisation), so nothing of the image is cut away (charts,
documents, text in the margins).

A sample with several images (some Cauldron subsets) keeps all of them, by ``multi_image``:
``"grid"`` (default) tiles them into one image (a near-square grid, each cell fitted by ``fit``), so the
sample stays an ``image`` sample with one frame as the schema requires; ``"frames"`` stores them as a frame
sequence in their order, and the sample is then written with ``media: "video"`` (no replication).

Every failure is a :class:`SkipItem` with a short reason, counted and listed by the writer's manifest.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fovlm.data.contract import FRAME_SETTINGS, IMAGENET_MEAN
from fovlm.data.frames import (
    FrameDecodeError,
    decode_video,
    resize_cover_crop,
    select_frame_times,
    times_to_indices,
)
from fovlm.data.schema import MAX_FRAMES, frame_field

PAD_COLOUR: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)  # type: ignore[assignment]


class SkipItem(Exception):
    """One input item that cannot become a sample. ``reason`` is the manifest's count key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MediaOptions:
    """How media is converted (the same for every item of a run; part of each shard's fingerprint).

    Args:
        size: side of the square frames, in pixels.
        jpeg_quality: JPEG quality of the stored frames (1-95).
        keep_mp4: store a video's ``.mp4`` instead of its frames (checked to decode first).
        fps: frames per second kept from videos.
        max_frames: at most this many frames per video (spread uniformly over longer videos).
        image_fit: ``"crop"`` (cover + centre crop) or ``"pad"`` (fit inside + pad with the mean colour).
        multi_image: ``"grid"`` or ``"frames"``: what a sample with several images becomes (module doc).
    """

    size: int = FRAME_SETTINGS.frame_size
    jpeg_quality: int = 90
    keep_mp4: bool = False
    fps: float = 1.0
    max_frames: int = MAX_FRAMES
    image_fit: str = "crop"
    multi_image: str = "grid"

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if not 1 <= self.max_frames <= MAX_FRAMES:
            raise ValueError(f"max_frames must be in 1..{MAX_FRAMES}, got {self.max_frames}")
        if self.image_fit not in ("crop", "pad"):
            raise ValueError(f"image_fit must be 'crop' or 'pad', got {self.image_fit!r}")
        if self.multi_image not in ("grid", "frames"):
            raise ValueError(f"multi_image must be 'grid' or 'frames', got {self.multi_image!r}")


@dataclass
class Converted:
    """The media members of one sample, its media kind as converted, and facts for the JSON/manifest."""

    members: dict[str, bytes]
    media: str
    num_frames: int
    duration: float | None = None


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of a media file; missing and empty files are skipped with their own reasons."""
    path = Path(path)
    if path.is_dir():
        raise SkipItem("unsupported_media", f"{path} is a folder (of frames?), not a video or image file")
    if not path.is_file():
        raise SkipItem("missing_file", f"{path} does not exist")
    data = path.read_bytes()
    if not data:
        raise SkipItem("empty_file", f"{path} is empty (0 bytes)")
    return data


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def probe_duration(data: bytes) -> float | None:
    """The container's duration in seconds from its header (PyAV), or None where it does not say."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / 1_000_000  # microseconds (av.time_base)
    except Exception:  # a header PyAV cannot read; decord may still decode it, duration is optional
        return None
    return None


def decode_segment(data: bytes, start: float, end: float, options: MediaOptions) -> torch.Tensor:
    """Frames of the segment ``[start, end)`` seconds, by the same selection rule as whole videos (decord).

    Returns uint8 [T, 3, size, size]."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        count, video_fps = len(reader), float(reader.get_avg_fps())
        end = min(end, count / video_fps)
        if end <= start:
            raise SkipItem("no_frames", f"segment [{start}, {end}] s is outside the {count / video_fps:.1f} s video")
        times = [start + t for t in select_frame_times(end - start, options.fps, options.max_frames)]
        array = reader.get_batch(times_to_indices(times, video_fps, count)).asnumpy()  # [T, H, W, 3] uint8
    except SkipItem:
        raise
    except Exception as err:  # decord's own errors on unreadable streams
        raise FrameDecodeError(f"decord: {type(err).__name__}: {err}", "bad_video") from err
    frames = [np.asarray(resize_cover_crop(Image.fromarray(a), options.size)) for a in array]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # [T, 3, size, size] uint8


def convert_video(data: bytes, options: MediaOptions, name: str = "video",
                  clip: tuple[float, float] | None = None) -> Converted:
    """Frames of an mp4's bytes at ``options.fps`` as JPEG members (or the mp4 itself, checked).

    ``clip``: only the segment ``(start, end)`` seconds (benchmarks that ask about part of a video); the
    segment's frames are always stored as JPEGs, since a kept mp4 would be decoded whole by the loader."""
    # A keep_mp4 check decodes small frames: the loader re-decodes at full size anyway.
    size = 32 if options.keep_mp4 and clip is None else options.size
    try:
        if clip is not None:
            frames = decode_segment(data, clip[0], clip[1], options)
        else:
            frames = decode_video(data, size=size, fps=options.fps, max_frames=options.max_frames)  # [T,3,S,S]
    except FrameDecodeError as err:
        raise SkipItem("unreadable_video", f"{name}: {err}") from err
    if frames.shape[0] == 0:
        raise SkipItem("no_frames", f"{name}: no frame decoded")
    duration = probe_duration(data)
    if options.keep_mp4 and clip is None:
        return Converted({"mp4": data}, "video", int(frames.shape[0]), duration)
    array = frames.permute(0, 2, 3, 1).numpy()  # [T, S, S, 3] uint8
    members = {frame_field(i): encode_jpeg(Image.fromarray(a), options.jpeg_quality) for i, a in enumerate(array)}
    return Converted(members, "video", len(members), duration)


def open_image(data: bytes, name: str = "image") -> Image.Image:
    """Decode image bytes to an RGB PIL image (fully loaded), or skip the item."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkipItem("unreadable_image", f"{name}: {type(err).__name__}: {err}") from err


def fit_image(image: Image.Image, size: int, fit: str) -> Image.Image:
    """``size x size`` by cover + centre crop (``"crop"``) or fit inside + mean-colour padding (``"pad"``)."""
    if fit == "crop":
        return resize_cover_crop(image, size)
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), PAD_COLOUR)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def tile_images(images: Sequence[Image.Image], size: int, fit: str) -> Image.Image:
    """All images on one ``size x size`` canvas: a grid of ``ceil(sqrt(n))`` columns, each cell fitted."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell = size // max(cols, rows)
    canvas = Image.new("RGB", (size, size), PAD_COLOUR)
    off_x, off_y = (size - cols * cell) // 2, (size - rows * cell) // 2
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(fit_image(image, cell, fit), (off_x + c * cell, off_y + r * cell))
    return canvas


def convert_images(datas: Sequence[bytes], options: MediaOptions, names: Sequence[str] | None = None) -> Converted:
    """One image -> one frame; several -> a grid image or a frame sequence (``options.multi_image``)."""
    if not datas:
        raise SkipItem("no_frames", "an image sample without any image")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(datas))]
    images = [open_image(d, n) for d, n in zip(datas, names)]
    if len(images) == 1 or options.multi_image == "grid":
        if len(images) == 1:
            frame = fit_image(images[0], options.size, options.image_fit)
        else:
            frame = tile_images(images, options.size, options.image_fit)
        return Converted({frame_field(0): encode_jpeg(frame, options.jpeg_quality)}, "image", 1)
    if len(images) > options.max_frames:
        raise SkipItem("too_many_images", f"{len(images)} images, more than max_frames={options.max_frames}")
    members = {
        frame_field(i): encode_jpeg(fit_image(im, options.size, options.image_fit), options.jpeg_quality)
        for i, im in enumerate(images)
    }
    return Converted(members, "video", len(members))


def frames_to_array(members: dict[str, bytes]) -> np.ndarray:
    """Decode a sample's numbered JPEG members back to uint8 [T, H, W, 3] (tests and checks)."""
    names = sorted(n for n in members if n[:3].isdigit())
    return np.stack([np.asarray(Image.open(io.BytesIO(members[n])).convert("RGB")) for n in names])
