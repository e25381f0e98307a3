"""Frames one at a time: a video, a folder of images or a live source as a lazy stream of :class:`StreamFrame`.

Each frame is ``uint8 [3, size, size]``, resized to cover and centre-cropped as :mod:`fovlm.data.frames` does;
one frame is decoded and converted at a time, never the whole video. :func:`video_frames` covers the *whole*
video at ``fps`` (no 64-frame cap; for a video up to 64 s its frames are :func:`~fovlm.data.frames.decode_video`'s),
:func:`folder_frames` a folder in name order, :func:`live_frames` any iterable (a camera) stamped by a clock;
:class:`LatestFrame` keeps only the newest frames of a live source for a slower consumer, and
:func:`open_frames` picks one of these for a path or an iterable. :func:`sample_video_frames` reads a video
sample's frames (those :func:`~fovlm.data.frames.sample_frames` would stack) one at a time from its tar members.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from fovlm.data.contract import FRAME_SETTINGS
from fovlm.data.frames import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    FrameDecodeError,
    av_duration,
    av_frames_at,
    decode_image,
    resize_cover_crop,
    select_frame_indices,
    select_frame_times,
    times_to_indices,
    to_uint8_chw,
    whole_intervals,
)

T = TypeVar("T")
LiveImage = Image.Image | np.ndarray | torch.Tensor
"""A live frame: a PIL image, a ``uint8 [H, W, 3]`` array or a ``uint8 [3, H, W]`` tensor."""


@dataclass(frozen=True)
class StreamFrame:
    """One frame of a stream: its position ``index`` (0, 1, ...), its time ``time_s`` in the source (seconds) and
    the frame, ``uint8 [3, size, size]``."""

    index: int
    time_s: float
    frame: torch.Tensor


def stream_times(
    duration_s: float, fps: float = FRAME_SETTINGS.fps, start_s: float = 0.0, max_frames: int | None = None
) -> Iterator[float]:
    """Times of a video's stream, lazily: ``(k + 0.5) / fps`` for each whole interval (the midpoint of a clip
    shorter than one), those at or after ``start_s``, at most ``max_frames`` of them.

    >>> list(stream_times(3.2)), list(stream_times(0.4))
    ([0.5, 1.5, 2.5], [0.2])
    >>> list(stream_times(100.0, fps=2.0, start_s=10.0, max_frames=2))
    [10.25, 10.75]
    """
    count = whole_intervals(duration_s, fps)
    if count < 1:
        times: Iterator[float] = iter([duration_s / 2.0])
    else:
        first = max(0, math.ceil(start_s * fps - 0.5 - 1e-9))  # skip straight to start_s
        times = ((k + 0.5) / fps for k in range(first, count))
    return itertools.islice((t for t in times if t >= start_s - 1e-9), max_frames)


def frame_tensor(image: LiveImage, size: int = FRAME_SETTINGS.frame_size) -> torch.Tensor:
    """A PIL image, ``uint8 [H, W, 3]`` array or ``uint8 [3, H, W]`` tensor as ``uint8 [3, size, size]``
    (resized to cover, centre-cropped)."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a frame tensor must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a frame array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"a frame must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    return to_uint8_chw(resize_cover_crop(image, size))


def _check(fps: float | None, size: int, max_frames: int | None, start_s: float = 0.0) -> None:
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps!r}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be None or at least 1, got {max_frames!r}")
    if not (start_s >= 0 and math.isfinite(start_s)):
        raise ValueError(f"start_s must be a finite time >= 0, got {start_s!r}")


def video_frames(
    path: str | os.PathLike,
    fps: float = FRAME_SETTINGS.fps,
    size: int = FRAME_SETTINGS.frame_size,
    start_s: float = 0.0,
    max_frames: int | None = None,
    spread: bool = False,
) -> Iterator[StreamFrame]:
    """The frames of a video file at ``fps`` (times from :func:`stream_times`), one at a time.

    With ``spread`` (and ``max_frames``) the times are instead the training rule's
    (:func:`fovlm.data.frames.select_frame_times`): a video longer than ``max_frames`` intervals gives
    ``max_frames`` frames spread over its whole length, as ``fovlm predict`` reads it.

    Arguments are checked now; the file is opened and decoded only from the first ``next()``. Frame t is the
    last frame that starts at or before t. Raises :class:`FrameDecodeError` naming the path for a missing file
    (``"missing"``), a video neither decord nor PyAV can open, or one whose decoding fails part-way
    (``"bad_video"``; once a backend has opened the file, the other one is not tried)."""
    _check(fps, size, max_frames, start_s)
    if spread and (max_frames is None or start_s):
        raise ValueError("spread takes max_frames and no start_s")
    path = Path(path)
    if not path.is_file():
        raise FrameDecodeError(f"{path}: no such video file", "missing")

    def times(duration_s: float) -> Iterator[float]:
        if spread:
            return iter(select_frame_times(duration_s, fps, max_frames))
        return stream_times(duration_s, fps, start_s, max_frames)

    return _video_stream(path, size, times, str(path))


def _opened(source: Path | bytes) -> str | io.BytesIO:
    """What decord and PyAV open for a video file (its path) or a video held in memory (its bytes)."""
    return str(source) if isinstance(source, Path) else io.BytesIO(source)


def _decord_reader(decord, source: Path | bytes):
    """decord's reader of a video file or in-memory video, its frame count and frame rate (both checked)."""
    reader = decord.VideoReader(_opened(source), ctx=decord.cpu(0), num_threads=1)
    count, video_fps = len(reader), float(reader.get_avg_fps())
    times_to_indices([0.0], video_fps, count)  # checks the count and the frame rate
    return reader, count, video_fps


def _video_stream(
    source: Path | bytes, size: int, times_of: Callable[[float], Iterator[float]], path: str
) -> Iterator[StreamFrame]:
    """The frames of a video file or in-memory video at the times ``times_of(duration)``; errors name ``path``."""
    errors = []
    try:
        import decord

        reader, count, video_fps = _decord_reader(decord, source)
    except Exception as err:  # ImportError, decord's DECORDError / RuntimeError, ValueError
        errors.append(f"decord: {type(err).__name__}: {err}")
    else:
        times = times_of(count / video_fps)
        stamped = ((t, times_to_indices([t], video_fps, count)[0]) for t in times)
        images = ((t, Image.fromarray(reader[i].asnumpy())) for t, i in stamped)  # [H, W, 3] uint8
        yield from _converted(images, size, path)
        return
    container = None
    try:
        import av

        container = av.open(_opened(source))
        stream = container.streams.video[0]
        duration, video_fps = av_duration(container, stream)
        times = times_of(duration)
    except Exception as err:  # ImportError, av.error.*, IndexError (no video stream), FrameDecodeError
        if container is not None:
            container.close()
        errors.append(f"PyAV: {type(err).__name__}: {err}")
        raise FrameDecodeError(f"{path}: cannot decode video ({'; '.join(errors)})", "bad_video") from err
    with container:
        selected = av_frames_at(container, stream, times_of(duration), video_fps)
        images = ((t, frame.to_image()) for t, frame in zip(times, selected, strict=True))
        yield from _converted(images, size, path)


def _converted(images: Iterator[tuple[float, Image.Image]], size: int, path: str) -> Iterator[StreamFrame]:
    """Stream frames of decoded (time, image) pairs; an error while decoding becomes a FrameDecodeError naming
    the path."""
    for index in itertools.count():
        try:
            time_s, image = next(images)
        except StopIteration:
            return
        except FrameDecodeError as err:
            raise FrameDecodeError(f"{path}: {err}", err.reason) from err
        except Exception as err:  # decord's DECORDError, av.error.*
            raise FrameDecodeError(f"{path}: cannot decode video ({type(err).__name__}: {err})", "bad_video") from err
        yield StreamFrame(index, time_s, to_uint8_chw(resize_cover_crop(image, size)))


def video_duration(data: bytes) -> float:
    """Seconds of an in-memory video, from the container of the backend that would decode it (decord's frame
    count over its frame rate, else PyAV's metadata); nothing is decoded. Raises :class:`FrameDecodeError`
    (``"bad_video"``) when neither backend can open it."""
    errors = []
    try:
        import decord

        _, count, video_fps = _decord_reader(decord, data)
        return count / video_fps
    except Exception as err:  # ImportError, decord's DECORDError / RuntimeError, ValueError
        errors.append(f"decord: {type(err).__name__}: {err}")
    try:
        import av

        with av.open(io.BytesIO(data)) as container:
            return av_duration(container, container.streams.video[0])[0]
    except Exception as err:  # av.error.*, IndexError (no video stream), FrameDecodeError
        errors.append(f"PyAV: {type(err).__name__}: {err}")
    raise FrameDecodeError(f"cannot decode video ({'; '.join(errors)})", "bad_video")


class SampleFrames:
    """A video sample's frames, ``uint8 [3, size, size]`` each, decoded one at a time while it is iterated (and
    again on every iteration) from the compressed members held in memory: never the whole stack.

    Attributes:
        error: the :class:`FrameDecodeError` that ended the last iteration part-way (None when none did).
        on_error: called with that error before it is raised to the consumer (e.g. to count a skipped sample).
    """

    def __init__(self, count: int, frames: Callable[[], Iterator[torch.Tensor]]) -> None:
        """Args: count: the frames an iteration gives; frames: opens a new iteration."""
        self.count = count
        self._frames = frames
        self.error: FrameDecodeError | None = None
        self.on_error: Callable[[FrameDecodeError], None] | None = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            yield from self._frames()
        except FrameDecodeError as err:
            self.error = err
            if self.on_error is not None:
                self.on_error(err)
            raise


def sample_video_frames(
    members: Mapping[str, bytes],
    size: int = FRAME_SETTINGS.frame_size,
    max_frames: int = FRAME_SETTINGS.max_frames,
    fps: float = FRAME_SETTINGS.fps,
) -> SampleFrames | None:
    """The frames :func:`fovlm.data.frames.sample_frames` gives for a video sample's tar members (suffix ->
    bytes), read lazily: the mp4's frames at the same times (counted from its container's metadata, see
    :func:`video_duration`), else the numbered frames thinned to ``max_frames``; None for a sample with
    neither (a single image). Raises :class:`FrameDecodeError` when the mp4 cannot be opened."""
    from fovlm.data.schema import frame_fields, video_field

    names = list(members)
    if (video := video_field(names)) is not None:
        data = members[video]
        count = len(select_frame_times(video_duration(data), fps, max_frames))

        def spread(duration_s: float) -> Iterator[float]:
            return iter(select_frame_times(duration_s, fps, max_frames))

        return SampleFrames(count, lambda: (f.frame for f in _video_stream(data, size, spread, video)))
    if numbered := frame_fields(names):
        chosen = [members[numbered[i]] for i in select_frame_indices(len(numbered), max_frames)]
        return SampleFrames(len(chosen), lambda: (decode_image(image, size) for image in chosen))
    return None


def folder_frames(
    path: str | os.PathLike,
    fps: float = FRAME_SETTINGS.fps,
    size: int = FRAME_SETTINGS.frame_size,
    max_frames: int | None = None,
) -> Iterator[StreamFrame]:
    """The images of a folder (suffixes :data:`~fovlm.data.frames.IMAGE_SUFFIXES`) in name order, frame i at
    ``i / fps`` s, each decoded only when it is reached. The folder is listed now: a missing folder or one
    without images raises :class:`FrameDecodeError` naming it, as does an image that cannot be decoded."""
    _check(fps, size, max_frames)
    path = Path(path)
    if not path.is_dir():
        raise FrameDecodeError(f"{path}: no such folder", "missing")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FrameDecodeError(f"folder {path} holds no frame image ({', '.join(IMAGE_SUFFIXES)})", "no_frames")
    return (StreamFrame(i, i / fps, _image_file(file, size)) for i, file in enumerate(files[:max_frames]))


def _image_file(path: Path, size: int) -> torch.Tensor:
    try:
        return decode_image(path.read_bytes(), size)
    except FrameDecodeError as err:
        raise FrameDecodeError(f"{path}: {err}", err.reason) from err


def _single_image(path: Path, size: int) -> Iterator[StreamFrame]:
    yield StreamFrame(0, 0.0, _image_file(path, size))


def live_frames(
    source: Iterable[LiveImage],
    fps: float | None = FRAME_SETTINGS.fps,
    size: int = FRAME_SETTINGS.frame_size,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[StreamFrame]:
    """Frames of a live source (any iterable of :data:`LiveImage`), stamped with ``clock()`` when each arrives,
    relative to the first. At most one frame per ``1/fps`` interval of that time is kept (the first to arrive
    in it; the others are skipped unconverted); ``fps=None`` keeps every frame."""
    _check(fps, size, None)
    return _live_stream(source, fps, size, clock)


def _live_stream(
    source: Iterable[LiveImage], fps: float | None, size: int, clock: Callable[[], float]
) -> Iterator[StreamFrame]:
    origin, last_slot, index = None, -1, 0
    for image in source:
        now = clock()
        origin = now if origin is None else origin
        time_s = now - origin
        if fps is not None:
            slot = math.floor(time_s * fps + 1e-9)
            if slot <= last_slot:
                continue
            last_slot = slot
        yield StreamFrame(index, time_s, frame_tensor(image, size))
        index += 1


class LatestFrame(Generic[T]):
    """Decouples a fast live source from a slow consumer: a background thread reads ``source`` into a buffer of
    ``capacity`` items; when it is full the OLDEST buffered item is dropped, so the consumer always gets the most
    recent ones.

    ``received`` counts items read into the buffer, ``dropped`` those pushed out unconsumed; once the source is
    exhausted and the buffer drained, iteration ends (so ``received == consumed + dropped``). An exception in
    the source is raised to the consumer after the buffered items. :meth:`close` (or leaving a ``with`` block)
    stops the thread after the source's current item and discards the buffer. Wrap the stamped stream,
    ``LatestFrame(live_frames(camera))``, so that frames are stamped when they arrive, not when consumed."""

    def __init__(self, source: Iterable[T], capacity: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity!r}")
        self.capacity = capacity
        self.received = 0
        self.dropped = 0
        self._buffer: deque[T] = deque()
        self._changed = threading.Condition()
        self._finished = False  # the source is exhausted, has failed or was closed
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(source,), name="LatestFrame", daemon=True)
        self._thread.start()

    def _read(self, source: Iterable[T]) -> None:
        items = None
        try:
            items = iter(source)
            for item in items:
                with self._changed:
                    if self._closed:
                        break
                    if len(self._buffer) == self.capacity:
                        self._buffer.popleft()
                        self.dropped += 1
                    self._buffer.append(item)
                    self.received += 1
                    self._changed.notify_all()
        except BaseException as err:  # handed to the consumer
            self._error = err
        finally:
            if hasattr(items, "close"):
                items.close()  # a generator source runs its cleanup in this thread
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def __iter__(self) -> LatestFrame[T]:
        return self

    def __next__(self) -> T:
        with self._changed:
            self._changed.wait_for(lambda: self._buffer or self._finished or self._closed)
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopIteration
            error, self._error = self._error, None
        if error is not None:
            raise error
        raise StopIteration

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop reading the source (after its current item) and discard the buffer; waits up to ``timeout_s``."""
        with self._changed:
            self._closed = True
            self._buffer.clear()
            self._changed.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> LatestFrame[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_frames(
    path_or_source: str | os.PathLike | Iterable[LiveImage],
    fps: float = FRAME_SETTINGS.fps,
    size: int = FRAME_SETTINGS.frame_size,
    max_frames: int | None = None,
) -> Iterator[StreamFrame]:
    """A stream from a folder (:func:`folder_frames`), a video file (:func:`video_frames`), an image file (one
    frame, index 0 at 0.0 s) or an iterable of live frames (:func:`live_frames`). A missing path or a file of
    another type raises :class:`FrameDecodeError` naming it."""
    if isinstance(path_or_source, str | os.PathLike):
        path = Path(path_or_source)
        if not path.exists():
            raise FrameDecodeError(f"{path} does not exist", "missing")
        if path.is_dir():
            return folder_frames(path, fps, size, max_frames)
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return video_frames(path, fps, size, max_frames=max_frames)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            _check(fps, size, max_frames)
            return _single_image(path, size)
        raise FrameDecodeError(
            f"{path}: unsupported file type {path.suffix!r} (video: {', '.join(VIDEO_SUFFIXES)}; "
            f"image: {', '.join(IMAGE_SUFFIXES)}; or a folder of frames)",
            "bad_media",
        )
    if isinstance(path_or_source, bytes | bytearray) or not isinstance(path_or_source, Iterable):
        raise TypeError(f"expected a path or an iterable of frames, got {type(path_or_source).__name__}")
    _check(fps, size, max_frames)
    return itertools.islice(live_frames(path_or_source, fps, size), max_frames)
