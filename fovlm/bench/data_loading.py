"""Data-loading section: SFTDataModule samples/s against the raw JPEG decode + resize rate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fovlm.bench.inputs import write_video_shard


def data_figures(workdir: Path, tokenizer_dir: str, samples: int, frames: int, source_size: int,
                 batch_size: int, workers: Sequence[int]) -> dict[str, Any]:
    """SFTDataModule samples/s (per worker count) against the raw JPEG decode + resize rate in this process."""
    from fovlm.data.datamodules import SFTDataModule
    from fovlm.data.frames import decode_image

    shard = workdir / "bench-000000.tar"
    jpegs = write_video_shard(shard, samples, frames, source_size)
    start = time.perf_counter()
    for data in jpegs:
        decode_image(data)
    decode_s = time.perf_counter() - start
    out: dict[str, Any] = {"samples": samples, "frames_per_sample": frames, "source_px": source_size,
                           "raw_decode_frames_per_s": len(jpegs) / decode_s,
                           "raw_decode_samples_per_s": samples / decode_s, "datamodule": {}}
    for num_workers in workers:
        dm = SFTDataModule(train_shards=str(shard), tokenizer=tokenizer_dir, text_ratio=0.0, batch_size=batch_size,
                           num_workers=num_workers, shuffle_buffer=batch_size, index_cache=str(workdir / "index"))
        dm.setup("fit")
        start = time.perf_counter()
        loader = iter(dm.train_dataloader())
        first = len(next(loader)["key"])
        started = time.perf_counter()  # worker start-up and the first batch are reported apart from the rate
        rest = sum(len(batch["key"]) for batch in loader)
        elapsed = time.perf_counter() - started
        total = time.perf_counter() - start
        # A small shuffle buffer, so the first batch does not wait for the whole shard to be decoded.
        out["datamodule"][str(num_workers)] = {
            "samples": first + rest, "first_batch_s": started - start, "total_s": total, "steady_s": elapsed,
            "samples_per_s": (first + rest) / total, "steady_samples_per_s": rest / elapsed,
            "vs_raw_decode": (first + rest) / total / out["raw_decode_samples_per_s"]}
    return out
