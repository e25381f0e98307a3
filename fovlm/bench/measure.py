"""Measuring: where a section runs, wall-clock timing, peak resident memory and the matmul rates.

Timings exclude warm-up calls and are the median of the timed repeats; on a CUDA device every reading waits
for the queued kernels first.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from fovlm.data.contract import FRAME_SETTINGS


@dataclass
class Env:
    """Where and how a section runs.

    Attributes:
        device: torch device.
        precision: "fp32" or "bf16" (bf16 autocast over fp32 weights, as bf16-mixed training does).
    """

    device: torch.device
    precision: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for "bf16", nothing for "fp32"."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def now(self) -> float:
        """Wall-clock seconds after every queued device kernel has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class PeakRSS:
    """Highest resident set size of this process while the context is open (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = 0  # RSS when the context opened (models, optimizer states, allocator caches)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRSS:
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def timed(env: Env, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = env.now()
        fn()
        times.append(env.now() - start)
    return statistics.median(times)


def matmul_rate(env: Env, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Best FLOP/s of a square ``size`` matmul in ``dtype`` over about ``seconds`` of repeats."""
    a = torch.randn(size, size, device=env.device).to(dtype)
    b = torch.randn(size, size, device=env.device).to(dtype)
    torch.matmul(a, b)
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = env.now()
        torch.matmul(a, b)
        elapsed = env.now() - start
        spent += elapsed
        best = max(best, 2 * size**3 / elapsed)
    return best


def matmul_peaks(env: Env, size: int, seconds: float) -> dict[str, float]:
    """The fp32 and bf16 matmul rates on ``env``'s device, the rates achieved FLOP/s are shared against.

    Args:
        env: the device (its precision is not used: each rate is measured in its own dtype).
        size: side of the square matrices.
        seconds: about how long each rate is measured for.
    """
    return {"fp32": matmul_rate(env, torch.float32, size, seconds),
            "bf16": matmul_rate(env, torch.bfloat16, size, seconds)}


def thread_check(frames: int = 4, image_size: int = FRAME_SETTINGS.frame_size) -> dict[str, float]:
    """fp32 DINOv2-small patch pass on the CPU with 1 thread and with the default count, in this run.

    On a machine whose cores other processes also use, every parallel op waits for the descheduled OpenMP
    thread and the multi-threaded run can be several times slower than one thread: this figure says whether
    the rest of the report was measured in that state.
    """
    from transformers import Dinov2Model

    from fovlm.model.encoder import FoveatedEncoder
    from fovlm.model.loading import dinov2_small_config

    encoder = FoveatedEncoder(Dinov2Model(dinov2_small_config())).eval()
    x = torch.randn(frames, 3, image_size, image_size)
    default = torch.get_num_threads()
    env = Env(torch.device("cpu"), "fp32")
    out: dict[str, float] = {"frames": frames, "default_threads": default}
    try:
        with torch.no_grad():
            for threads in sorted({1, default}):
                torch.set_num_threads(threads)
                out[f"patch_pass_s_{threads}_threads"] = timed(env, lambda: encoder.encode_patches(x), 2)
    finally:
        torch.set_num_threads(default)
    out["default_vs_one_thread_speedup"] = out["patch_pass_s_1_threads"] / out[f"patch_pass_s_{default}_threads"]
    return out
