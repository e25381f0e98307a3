"""Frames: which frames of a video are kept, decoding, resize + centre crop, normalisation, image replication.

- :func:`select_frame_times` is THE frame-selection rule (the shard converters and the loader both call it):
  1 frame per second at the centre of each second, ``min(duration, 64)`` frames, and over videos longer
  than 64 s, 64 frames spread uniformly over the whole video (the fVLM original kept only the first 64 s).
- Frames are decoded to ``uint8 [T, 3, H, W]`` (resize so the image covers ``size x size``, then centre
  crop); :func:`normalize` turns a stack into ImageNet-normalised float32. Keeping uint8 until collation
  makes worker-to-main transfers 4x smaller.
- ``KEY.mp4`` is decoded with decord; where decord is missing (it has no wheel for some platforms) or
  cannot open the stream, PyAV decodes it.
- :mod:`fovlm.data.frame_stream` reads the same frames one at a time (a video, a folder, a live source).
- A single *image* is replicated to ``image_frames`` identical frames (8 by default); a one-frame *video*
  keeps its one frame: the decision is made from the sample's explicit ``media``, never from the count.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fovlm.data.contract import FRAME_SETTINGS

if TYPE_CHECKING:
    import av

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""File suffixes read as images (a single image, or the frames of a folder)."""
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
"""File suffixes read as videos."""


class FrameDecodeError(ValueError):
    """A frame or video that cannot be decoded; ``reason`` is ``"bad_image"``, ``"bad_video"``, ``"no_frames"``,
    ``"bad_media"`` or ``"missing"`` (a media path that does not exist)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def select_frame_times(
    duration_s: float, fps: float = FRAME_SETTINGS.fps, max_frames: int = FRAME_SETTINGS.max_frames
) -> list[float]:
    """Timestamps (seconds) of the frames to keep from a video of ``duration_s`` seconds.

    At ``fps`` frames per second, each frame taken at the centre of its ``1/fps`` interval, so a clip
    shorter than one interval still gives one frame (its midpoint). When more than ``max_frames`` would
    result, ``max_frames`` frames are spread uniformly over the whole video instead (again at the centres
    of equal intervals), so the end of a long video is seen as well as its start.

    >>> select_frame_times(0.4)
    [0.2]
    >>> select_frame_times(3.0)
    [0.5, 1.5, 2.5]
    >>> len(select_frame_times(600.0)), select_frame_times(128.0)[:2]
    (64, [1.0, 3.0])
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames!r}")
    natural = whole_intervals(duration_s, fps)
    if natural < 1:
        return [duration_s / 2.0]
    if natural <= max_frames:
        return [(k + 0.5) / fps for k in range(natural)]
    step = duration_s / max_frames
    return [(k + 0.5) * step for k in range(max_frames)]


def whole_intervals(duration_s: float, fps: float) -> int:
    """How many whole ``1/fps`` intervals a video of ``duration_s`` seconds holds (0 for a clip shorter than one).

    >>> whole_intervals(2.9999999999, 1.0), whole_intervals(0.4, 1.0)
    (3, 0)
    """
    if not (isinstance(duration_s, int | float) and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive finite number of seconds, got {duration_s!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps!r}")
    return math.floor(duration_s * fps + 1e-9)  # tolerance for 2.9999999 from float fps


def times_to_indices(times: Sequence[float], video_fps: float, num_frames: int) -> list[int]:
    """Frame indices of a stream at ``video_fps`` with ``num_frames`` frames nearest below each timestamp."""
    if num_frames < 1:
        raise ValueError("the video has no frame")
    if not (video_fps > 0 and math.isfinite(video_fps)):
        raise ValueError(f"the video reports an invalid frame rate {video_fps!r}")
    return [min(max(int(t * video_fps), 0), num_frames - 1) for t in times]


def select_frame_indices(count: int, max_frames: int = FRAME_SETTINGS.max_frames) -> list[int]:
    """Which of ``count`` frames already sampled at 1 FPS to keep: all of them up to ``max_frames``,
    else ``max_frames`` spread uniformly (the same rule as :func:`select_frame_times`)."""
    if count < 1:
        return []
    return times_to_indices(select_frame_times(float(count), 1.0, max_frames), 1.0, count)


def resize_cover_crop(image: Image.Image, size: int = FRAME_SETTINGS.frame_size) -> Image.Image:
    """Resize so the image covers ``size x size`` (aspect kept), then crop the centre square.

    Bicubic with reducing_gap, which is PIL's antialiased downscale (no aliasing on large frames)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB image ``[H, W, 3]`` as a contiguous ``uint8 [3, H, W]`` tensor."""
    # Transposed in numpy into a contiguous array: a permuted torch view makes every later stack/copy take
    # a slow strided path (orders of magnitude slower under multi-threading).
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [3, H, W] uint8


def decode_image(data: bytes, size: int = FRAME_SETTINGS.frame_size) -> torch.Tensor:
    """Decode JPEG/PNG bytes to ``uint8 [3, size, size]`` (RGB, resized to cover and centre-cropped)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # JPEG draft mode decodes at a reduced scale that still covers size x size: much faster on
            # large images and then resized as usual.
            image.draft("RGB", (size, size))
            image.load()
            frame = resize_cover_crop(image, size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise FrameDecodeError(f"cannot decode image ({type(err).__name__}: {err})", "bad_image") from err
    return to_uint8_chw(frame)


def decode_images(datas: Sequence[bytes], size: int = FRAME_SETTINGS.frame_size) -> torch.Tensor:
    """Decode a sequence of frame images to ``uint8 [T, 3, size, size]``."""
    if not datas:
        raise FrameDecodeError("no frame to decode", "no_frames")
    return torch.stack([decode_image(d, size) for d in datas])  # [T, 3, size, size]


def _decode_video_decord(data: bytes, size: int, fps: float, max_frames: int) -> torch.Tensor:
    import decord

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    count = len(reader)
    video_fps = float(reader.get_avg_fps())
    indices = times_to_indices(select_frame_times(count / video_fps, fps, max_frames), video_fps, count)
    array = reader.get_batch(indices).asnumpy()  # [T, H, W, 3] uint8
    return torch.stack([to_uint8_chw(resize_cover_crop(Image.fromarray(a), size)) for a in array])


def av_duration(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[float, float]:
    """(duration in seconds, average frame rate or 0.0 when unknown) of a PyAV video stream, from its metadata."""
    rate = stream.average_rate or stream.guessed_rate
    video_fps = float(rate) if rate else 0.0
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base), video_fps
    if container.duration:
        return container.duration / 1e6, video_fps  # microseconds
    if stream.frames and video_fps > 0:
        return stream.frames / video_fps, video_fps
    raise FrameDecodeError("the video reports no duration", "bad_video")


def av_frames_at(
    container: av.container.InputContainer, stream: av.VideoStream, times: Iterable[float], video_fps: float
) -> Iterator[av.VideoFrame]:
    """The decoded frame for each of the ascending ``times``, in order, decoding sequentially and holding only
    the previous frame: frame t is the last frame that starts at or before t (as with decord's indices), the
    first frame for times before it and the last frame for times after the last start (the metadata may round
    the duration up). Decoding stops once every time has its frame; ``times`` is read lazily."""
    pending = iter(times)
    due, previous = next(pending, None), None
    if due is None:
        return
    for i, frame in enumerate(container.decode(stream)):
        start = frame.time if frame.time is not None else (i / video_fps if video_fps > 0 else 0.0)
        while due is not None and start > due + 1e-6:
            yield previous if previous is not None else frame
            due = next(pending, None)
        previous = frame
        if due is None:
            return
    if previous is None:
        raise FrameDecodeError("the video stream has no frame", "bad_video")
    while due is not None:
        yield previous
        due = next(pending, None)


def _decode_video_av(data: bytes, size: int, fps: float, max_frames: int) -> torch.Tensor:
    """Decode with PyAV, streaming: only the selected frames are converted and kept, so a long video never
    sits in memory (see :func:`av_frames_at`)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        duration, video_fps = av_duration(container, stream)
        times = select_frame_times(duration, fps, max_frames)
        selected = av_frames_at(container, stream, times, video_fps)
        kept = [to_uint8_chw(resize_cover_crop(frame.to_image(), size)) for frame in selected]
    return torch.stack(kept)  # [T, 3, size, size] uint8


def decode_video(
    data: bytes,
    size: int = FRAME_SETTINGS.frame_size,
    fps: float = FRAME_SETTINGS.fps,
    max_frames: int = FRAME_SETTINGS.max_frames,
) -> torch.Tensor:
    """Decode an mp4 to ``uint8 [T, 3, size, size]`` at ``fps`` (see :func:`select_frame_times`).

    decord first; PyAV where decord is not installed or cannot read the stream."""
    errors = []
    try:
        return _decode_video_decord(data, size, fps, max_frames)
    except ImportError as err:
        errors.append(f"decord unavailable: {err}")
    except Exception as err:  # decord raises its own DECORDError / RuntimeError on bad streams
        errors.append(f"decord: {type(err).__name__}: {err}")
    try:
        return _decode_video_av(data, size, fps, max_frames)
    except FrameDecodeError:
        raise
    except Exception as err:  # PyAV raises av.error.* (InvalidDataError, ...), ValueError, ZeroDivisionError
        errors.append(f"PyAV: {type(err).__name__}: {err}")
    raise FrameDecodeError("cannot decode video (" + "; ".join(errors) + ")", "bad_video")


def replicate_image(frames: torch.Tensor, n: int = FRAME_SETTINGS.image_frames) -> torch.Tensor:
    """Repeat a one-frame image stack ``[1, 3, H, W]`` to ``[n, 3, H, W]``."""
    if frames.shape[0] != 1:
        raise ValueError(f"an image has exactly one frame, got {frames.shape[0]}")
    if n < 1:
        raise ValueError(f"image_frames must be at least 1, got {n}")
    return frames.expand(n, *frames.shape[1:]).clone()  # [n, 3, H, W]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ImageNet-normalised (same shape): ``(x / 255 - mean) / std``."""
    std = torch.tensor(FRAME_SETTINGS.std, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    scale = 1.0 / (255.0 * std)
    bias = -torch.tensor(FRAME_SETTINGS.mean, dtype=torch.float32, device=frames.device).view(3, 1, 1) / std
    # One conversion and two in-place passes (4x faster than the textbook three temporaries).
    return frames.to(torch.float32).mul_(scale).add_(bias)  # [..., 3, H, W] float32


def sample_frames(
    members: dict[str, bytes],
    media: str,
    size: int = FRAME_SETTINGS.frame_size,
    max_frames: int = FRAME_SETTINGS.max_frames,
    image_frames: int = FRAME_SETTINGS.image_frames,
    fps: float = FRAME_SETTINGS.fps,
) -> torch.Tensor | None:
    """A sample's frames as ``uint8 [T, 3, size, size]`` from its tar members (suffix -> bytes), or None for
    a text sample.

    Precedence as in the fVLM original: ``mp4``, then the numbered frames (``000.jpg`` ...; more than
    ``max_frames`` are thinned uniformly), then an un-numbered image. An image sample must have exactly one
    frame and is replicated to ``image_frames``; a video keeps its count, even one.

    Raises:
        FrameDecodeError: reason ``bad_image`` / ``bad_video`` (undecodable), ``no_frames`` (a visual sample
            without any frame member) or ``bad_media`` (an image sample with several frames).
    """
    from fovlm.data.schema import frame_fields, single_image_field, video_field

    if media == "text":
        return None
    names = list(members)
    if (video := video_field(names)) is not None:
        frames = decode_video(members[video], size, fps, max_frames)
    elif numbered := frame_fields(names):
        keep = select_frame_indices(len(numbered), max_frames)
        frames = decode_images([members[numbered[i]] for i in keep], size)
    elif (single := single_image_field(names)) is not None:
        frames = decode_images([members[single]], size)
    else:
        raise FrameDecodeError(f"a {media} sample without any frame member", "no_frames")
    if media == "image":
        if frames.shape[0] != 1:
            raise FrameDecodeError(f"an image sample has {frames.shape[0]} frames, expected 1", "bad_media")
        frames = replicate_image(frames, image_frames)
    return frames  # [T, 3, size, size] uint8
