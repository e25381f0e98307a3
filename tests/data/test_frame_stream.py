"""Frame streams: a video (decord and PyAV), a folder, a live source, the newest-frame buffer and dispatch."""

import itertools
import re
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from shardkit import image_bytes

from fovlm.data import frame_stream as FS
from fovlm.data import frames as F


def write_mp4(path, num_frames: int, fps: int, size=(64, 48), gop: int = 12):
    """An H.264 mp4 whose frame i is a solid colour, i written in base 6 with digits of 40 levels in red, green
    and blue (up to 216 frames, so frames can be told apart); key frames every ``gop`` frames (seeking is not
    trivial). Returns (path, bytes)."""
    import av

    w, h = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qp": "0", "g": str(gop)}
        for i in range(num_frames):
            array = np.empty((h, w, 3), dtype=np.uint8)
            array[...] = (40 * (i % 6), 40 * (i // 6 % 6), 40 * (i // 36))
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """5 s at 10 fps, 64x48."""
    return write_mp4(tmp_path_factory.mktemp("clips") / "short.mp4", 50, fps=10)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """70 s at 1 fps, 32x24: longer than the 64-frame cap of decode_video."""
    return write_mp4(tmp_path_factory.mktemp("clips") / "long.mp4", 70, fps=1, size=(32, 24))


@pytest.fixture(params=["decord", "pyav"])
def backend(request, monkeypatch):
    """Only one backend can open a video: the other one fails (decord's import, or PyAV's open)."""
    import av

    if request.param == "pyav":
        monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    else:
        monkeypatch.setattr(av, "open", lambda *a, **k: pytest.fail("PyAV used although decord works"))
    return request.param


def stacked(stream) -> torch.Tensor:
    return torch.stack([f.frame for f in stream])


def source_index(frames: torch.Tensor) -> list[int]:
    """Which frame of a :func:`write_mp4` video each of ``frames`` is."""
    digits = (frames[:, :, 4, 4].float() / 40).round().long()  # [T, 3]
    return (digits[:, 0] + 6 * digits[:, 1] + 36 * digits[:, 2]).tolist()


def test_stream_times_match_the_selection_rule_up_to_the_cap():
    for duration in (0.4, 1.0, 3.2, 10.7, 64.0):
        assert list(FS.stream_times(duration)) == F.select_frame_times(duration)
    assert list(FS.stream_times(5.0, fps=2.0)) == F.select_frame_times(5.0, fps=2.0)
    assert list(FS.stream_times(70.0)) == [k + 0.5 for k in range(70)]  # no cap, no spreading
    assert list(FS.stream_times(10.0, start_s=2.3, max_frames=3)) == [2.5, 3.5, 4.5]
    assert list(FS.stream_times(10.0, start_s=2.5)) == [k + 0.5 for k in range(2, 10)]
    assert list(FS.stream_times(10.0, start_s=11.0)) == [] and list(FS.stream_times(0.4, start_s=0.3)) == []


@pytest.mark.parametrize("fps", [1.0, 2.5])
def test_video_stream_equals_decode_video(short_clip, backend, fps):
    path, data = short_clip
    expected = F.decode_video(data, 16, fps=fps, max_frames=64)
    stream = list(FS.video_frames(path, fps=fps, size=16))
    assert [f.index for f in stream] == list(range(len(expected)))
    assert [f.time_s for f in stream] == F.select_frame_times(5.0, fps=fps)
    frames = stacked(stream)
    assert frames.dtype == torch.uint8 and frames.shape == (len(expected), 3, 16, 16)
    assert torch.equal(frames, expected)
    if fps == 1.0:
        assert source_index(frames) == [5, 15, 25, 35, 45]  # t = k + 0.5 s at 10 fps


def test_video_stream_covers_a_long_video(long_clip):
    path, data = long_clip
    stream = list(FS.video_frames(path, fps=1, size=8))
    assert [f.time_s for f in stream] == [k + 0.5 for k in range(70)]
    assert torch.equal(stacked(stream), F.decode_video(data, 8, fps=1, max_frames=1000))
    assert source_index(stacked(stream)[-3:]) == [67, 68, 69]


def test_decord_stream_is_lazy(long_clip, monkeypatch):
    import decord

    real_reader, opened, read = decord.VideoReader, [], []

    class CountingReader:
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            self.reader = real_reader(*args, **kwargs)

        def __len__(self):
            return len(self.reader)

        def get_avg_fps(self):
            return self.reader.get_avg_fps()

        def __getitem__(self, index):
            read.append(index)
            return self.reader[index]

    monkeypatch.setattr(decord, "VideoReader", CountingReader)
    stream = FS.video_frames(long_clip[0], fps=1, size=8)
    assert opened == [] and read == []
    first_two = list(itertools.islice(stream, 2))
    assert [f.time_s for f in first_two] == [0.5, 1.5] and opened == [str(long_clip[0])] and read == [0, 1]


def test_pyav_stream_is_lazy_and_holds_one_frame(long_clip, monkeypatch):
    import av

    monkeypatch.setitem(sys.modules, "decord", None)
    real_open, decoded, converted = av.open, [], []

    class CountingContainer:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.container.close()

        def decode(self, stream):
            for frame in self.container.decode(stream):
                decoded.append(frame.time)
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k)))
    real_convert = FS.to_uint8_chw
    monkeypatch.setattr(FS, "to_uint8_chw", lambda image: converted.append(1) or real_convert(image))
    stream = FS.video_frames(long_clip[0], fps=1, size=8)
    assert decoded == [] and converted == []
    first_two = list(itertools.islice(stream, 2))
    assert [f.time_s for f in first_two] == [0.5, 1.5] and source_index(stacked(first_two)) == [0, 1]
    assert len(decoded) == 3 and len(converted) == 2  # frame 2 (t = 2 s) shows that frame 1 is t = 1.5's


def test_max_frames_and_start(short_clip, backend):
    path, _ = short_clip
    full = list(FS.video_frames(path, fps=1, size=16))
    part = list(FS.video_frames(path, fps=1, size=16, start_s=2.0, max_frames=2))
    assert [(f.index, f.time_s) for f in part] == [(0, 2.5), (1, 3.5)]
    assert torch.equal(stacked(part), stacked(full[2:4]))
    assert len(list(FS.video_frames(path, fps=1, size=16, max_frames=3))) == 3
    assert list(FS.video_frames(path, fps=1, size=16, start_s=9.0)) == []
    for bad in ({"start_s": -1.0}, {"max_frames": 0}, {"fps": 0.0}):
        with pytest.raises(ValueError):
            FS.video_frames(path, **bad)


def test_video_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(F.FrameDecodeError, match=re.escape(str(missing))) as info:
        FS.video_frames(missing)
    assert info.value.reason == "missing"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    stream = FS.video_frames(bad)  # opened lazily
    with pytest.raises(F.FrameDecodeError, match=re.escape(str(bad))) as info:
        next(stream)
    assert info.value.reason == "bad_video" and "decord" in str(info.value) and "PyAV" in str(info.value)


def write_images(folder, colours):
    folder.mkdir()
    for name, colour in colours.items():
        (folder / name).write_bytes(image_bytes(colour, (24, 16), fmt="PNG"))
    (folder / "notes.txt").write_text("not a frame")
    return folder


def test_folder_frames(tmp_path, monkeypatch):
    colours = {"b.png": (0, 200, 0), "a.png": (200, 0, 0), "c.PNG": (0, 0, 200)}
    folder = write_images(tmp_path / "frames", colours)
    decoded = []
    real_decode = FS.decode_image
    monkeypatch.setattr(FS, "decode_image", lambda data, size: decoded.append(size) or real_decode(data, size))
    stream = FS.folder_frames(folder, fps=2, size=8)
    assert decoded == []
    first = next(stream)
    assert decoded == [8] and (first.index, first.time_s) == (0, 0.0)
    rest = list(stream)
    assert [(f.index, f.time_s) for f in rest] == [(1, 0.5), (2, 1.0)]
    for frame, name in zip([first, *rest], ["a.png", "b.png", "c.PNG"], strict=True):
        assert torch.equal(frame.frame, F.decode_image((folder / name).read_bytes(), 8))
    assert len(list(FS.folder_frames(folder, size=8, max_frames=2))) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(F.FrameDecodeError, match="empty"):
        FS.folder_frames(tmp_path / "empty")
    (folder / "d.png").write_bytes(b"not a png")
    with pytest.raises(F.FrameDecodeError, match=re.escape(str(folder / "d.png"))):
        list(FS.folder_frames(folder, size=8))


def test_frame_tensor_converts_every_kind():
    array = np.zeros((30, 60, 3), dtype=np.uint8)
    array[:, :20, 0], array[:, 20:40, 1], array[:, 40:, 2] = 255, 255, 255
    expected = F.to_uint8_chw(F.resize_cover_crop(Image.fromarray(array), 16))
    assert torch.equal(FS.frame_tensor(array, 16), expected)
    assert torch.equal(FS.frame_tensor(Image.fromarray(array), 16), expected)
    assert torch.equal(FS.frame_tensor(torch.from_numpy(array).permute(2, 0, 1), 16), expected)
    for bad in (array.astype(np.float32), array[..., 0], torch.zeros(3, 8, 8)):
        with pytest.raises(ValueError):
            FS.frame_tensor(bad, 16)
    with pytest.raises(TypeError):
        FS.frame_tensor([[0]], 16)


def test_live_frames_stamps_with_the_clock_and_keeps_one_per_interval():
    arrays = [np.full((12, 20, 3), 10 * i, dtype=np.uint8) for i in range(6)]
    source = [arrays[0], Image.fromarray(arrays[1]), torch.from_numpy(arrays[2]).permute(2, 0, 1), *arrays[3:]]
    readings = [10.0, 10.2, 10.9, 11.0, 12.7, 13.1]
    every = list(FS.live_frames(source, fps=None, size=8, clock=iter(readings).__next__))
    assert [f.index for f in every] == list(range(6))
    assert [f.time_s for f in every] == pytest.approx([0.0, 0.2, 0.9, 1.0, 2.7, 3.1])
    assert all(torch.equal(f.frame, FS.frame_tensor(a, 8)) for f, a in zip(every, arrays, strict=True))
    kept = list(FS.live_frames(source, fps=1, size=8, clock=iter(readings).__next__))
    assert [f.index for f in kept] == [0, 1, 2, 3]  # the first frame of each second
    assert [f.time_s for f in kept] == pytest.approx([0.0, 1.0, 2.7, 3.1])
    assert torch.equal(kept[1].frame, every[3].frame)


def gated_source(paused: threading.Event, go: threading.Event, finished: threading.Event, total=20, before=5):
    """Yields 0 .. before-1, waits for ``go``, yields the rest: where the consumer stands is deterministic."""
    yield from range(before)
    paused.set()
    assert go.wait(10)
    yield from range(before, total)
    finished.set()


@pytest.mark.parametrize(("capacity", "first", "rest"), [(1, 4, [19]), (3, 2, [17, 18, 19])])
def test_latest_frame_drops_the_oldest(capacity, first, rest):
    paused, go, finished = threading.Event(), threading.Event(), threading.Event()
    with FS.LatestFrame(gated_source(paused, go, finished), capacity=capacity) as latest:
        assert paused.wait(10)  # items 0 .. 4 are read: only the newest `capacity` are kept
        assert next(latest) == first
        go.set()
        assert finished.wait(10)  # the other 15 are read while the consumer is busy
        consumed = [first, *latest]
    assert consumed == [first, *rest]
    assert latest.received == 20 == len(consumed) + latest.dropped


def test_latest_frame_of_a_live_stream():
    source = (np.full((8, 8, 3), i, dtype=np.uint8) for i in range(30))
    with FS.LatestFrame(FS.live_frames(source, fps=None, size=4), capacity=2) as latest:
        consumed = []
        for item in latest:
            consumed.append(item.index)
            threading.Event().wait(0.002)  # a slow consumer
    assert consumed == sorted(set(consumed)) and consumed[-1] == 29
    assert latest.received == 30 == len(consumed) + latest.dropped


def test_latest_frame_reraises_and_closes():
    def failing():
        yield from (0, 1)
        raise RuntimeError("camera lost")

    got = []
    with pytest.raises(RuntimeError, match="camera lost"):
        for item in FS.LatestFrame(failing(), capacity=2):
            got.append(item)
    assert got == [0, 1]

    stopped = threading.Event()

    def endless():
        try:
            for i in itertools.count():
                threading.Event().wait(0.001)
                yield i
        finally:
            stopped.set()

    latest = FS.LatestFrame(endless())
    assert isinstance(next(latest), int)
    latest.close()
    assert stopped.is_set()  # the source was closed in its thread
    with pytest.raises(StopIteration):
        next(latest)
    with pytest.raises(ValueError):
        FS.LatestFrame([], capacity=0)


def test_open_frames_dispatches(tmp_path, short_clip):
    folder = write_images(tmp_path / "frames", {"a.png": (200, 0, 0), "b.png": (0, 200, 0)})
    assert [f.index for f in FS.open_frames(folder, fps=1, size=8)] == [0, 1]
    video = list(FS.open_frames(str(short_clip[0]), fps=1, size=8, max_frames=2))
    assert [f.time_s for f in video] == [0.5, 1.5]
    (image,) = FS.open_frames(folder / "b.png", fps=1, size=8)
    assert (image.index, image.time_s) == (0, 0.0)
    assert torch.equal(image.frame, F.decode_image((folder / "b.png").read_bytes(), 8))
    (live,) = FS.open_frames(iter([np.zeros((8, 8, 3), np.uint8)] * 3), fps=1, size=8, max_frames=1)
    assert (live.index, live.time_s) == (0, 0.0)
    for bad in (folder / "notes.txt", tmp_path / "nowhere.mp4"):
        with pytest.raises(F.FrameDecodeError, match=re.escape(str(bad))):
            FS.open_frames(bad)
    with pytest.raises(TypeError):
        FS.open_frames(b"bytes are not frames")



@pytest.mark.parametrize("max_frames", [16, 100])
def test_sample_video_frames_are_sample_frames_read_one_at_a_time(long_clip, backend, max_frames):
    members = {"json": b"{}", "mp4": long_clip[1]}
    expected = F.sample_frames(members, "video", size=8, max_frames=max_frames)  # [T, 3, 8, 8]
    lazy = FS.sample_video_frames(members, size=8, max_frames=max_frames)
    assert isinstance(lazy, FS.SampleFrames) and len(lazy) == len(expected) == min(70, max_frames)
    assert torch.equal(torch.stack(list(lazy)), expected)
    assert torch.equal(torch.stack(list(lazy)), expected)  # every iteration decodes again


def test_sample_video_frames_of_numbered_frames_and_errors():
    numbered = {f"{i:03d}.png": image_bytes((10 * i, 0, 0), (24, 16), fmt="PNG") for i in range(5)}
    lazy = FS.sample_video_frames(numbered, size=8, max_frames=3)
    assert torch.equal(torch.stack(list(lazy)), F.sample_frames(numbered, "video", size=8, max_frames=3))
    assert FS.sample_video_frames({"png": numbered["000.png"]}) is None  # a single image: nothing to stream
    broken = FS.sample_video_frames({**numbered, "003.png": b"not a png"}, size=8)
    seen = []
    broken.on_error = seen.append
    with pytest.raises(F.FrameDecodeError) as info:
        list(broken)
    assert info.value.reason == "bad_image" and seen == [info.value] and broken.error is info.value
    with pytest.raises(F.FrameDecodeError) as info:
        FS.sample_video_frames({"mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200})
    assert info.value.reason == "bad_video"
