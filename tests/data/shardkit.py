"""Test helpers for the data tests: tiny JPEG/PNG frames, tiny mp4 videos, webdataset shards with their stats,
and a local HTTP server to stream them from."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 60),
    size: tuple[int, int] = (32, 32),
    fmt: str = "JPEG",
    pattern: int = 0,
) -> bytes:
    """A small image; ``pattern`` > 0 adds a deterministic gradient so frames differ."""
    w, h = size
    array = np.empty((h, w, 3), dtype=np.uint8)
    array[...] = color
    if pattern:
        array[..., 0] = (np.arange(w)[None, :] * pattern) % 256
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def mp4_bytes(num_frames: int, fps: int = 4, size: tuple[int, int] = (64, 48), step: int = 8) -> bytes:
    """An H.264 mp4 whose frame i has a red level of ``step * i`` (capped at 255), so frames can be told apart."""
    import av

    w, h = size
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10", "g": "1"}
        for i in range(num_frames):
            array = np.zeros((h, w, 3), dtype=np.uint8)
            array[..., 0] = min(255, step * i)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_shard(path: Path, samples: Iterable[Mapping[str, Any]]) -> Path:
    """Write samples (``{"__key__": ..., "json": dict|bytes, "000.jpg": bytes, ...}``) to a tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            record = dict(sample)
            if isinstance(record.get("json"), dict):
                record["json"] = json.dumps(record["json"]).encode("utf-8")
            sink.write(record)
    return path


SIZES = [5, 1, 9, 3, 12, 7, 2]  # 39 samples in 7 shards of uneven sizes


def video_shards(root: Path, sizes: Sequence[int] = SIZES) -> list[str]:
    """Caption shards ``video-000.tar`` ... of ``sizes[s]`` samples each (keys ``v{s}_{i:02d}``, 1 to 3 frames)."""
    paths = []
    for s, n in enumerate(sizes):
        samples = [
            caption_sample(f"v{s}_{i:02d}", f"clip {s} {i}", frames=1 + (s + i) % 3, size=(8, 8))
            for i in range(n)
        ]
        paths.append(str(write_shard(root / f"video-{s:03d}.tar", samples)))
    return paths


def caption_sample(
    key: str,
    caption: str,
    frames: int = 2,
    source: str = "openvid",
    media: str = "video",
    size: tuple[int, int] = (32, 32),
) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key, "json": {"source": source, "media": media, "caption": caption}}
    for i in range(frames):
        sample[f"{i:03d}.jpg"] = image_bytes((10 * i % 256, 100, 150), size, pattern=i + 1)
    return sample


def text_sample(key: str, answer: str, source: str = "smoltalk") -> dict[str, Any]:
    return {
        "__key__": key,
        "json": {
            "source": source,
            "media": "text",
            "messages": [
                {"role": "user", "content": "Say something."},
                {"role": "assistant", "content": answer},
            ],
        },
    }


def write_stats(paths: Iterable[str]) -> None:
    """Write the stats file with the shard index beside each local shard (as ``data_prep`` does)."""
    from data_prep.stats_index import write_stats_index

    for path in paths:
        write_stats_index(path)


class ShardServer:
    """A local HTTP server over a folder (``http.server`` in a thread) that counts the requests per path.

    Args:
        root: the folder served.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: Counter[str] = Counter()
        self._server: Any = None

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def __enter__(self) -> ShardServer:
        import functools
        import http.server
        import threading

        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                requests[self.path.lstrip("/")] += 1
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(self.root))
        )
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
