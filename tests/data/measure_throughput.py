"""Measure the SFT DataModule's throughput against plain JPEG decoding of the same frames (not a test).

Writes ``--clips`` 8-frame clips of 224 px JPEG frames into shards, then reports
- the DataModule's samples/s and frames/s (2 loader workers, batch 8, real SmolLM2 tokenizer, one full epoch,
  the first batch excluded so worker start-up is not counted), as a Trainer receives the batches (uint8
  frames) and with the frames normalised in the main process, and
- the decode rate of the same JPEG bytes in one process: PIL decode alone, and fovlm.data.frames.decode_image
  (decode + RGB + uint8 tensor; the frames are already 224 px, so no resize happens).

    .venv/bin/python tests/data/measure_throughput.py --clips 400
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from shardkit import write_shard  # noqa: E402

from fovlm.data.datamodules import SFTDataModule  # noqa: E402
from fovlm.data.frames import decode_image  # noqa: E402
from fovlm.model.loading import prepare_smollm2  # noqa: E402


def frame_jpeg(rng: np.random.Generator, t: int) -> bytes:
    """A 224 px frame with smooth structure and mild noise (about the size of a real JPEG frame at q 90)."""
    y, x = np.mgrid[0:224, 0:224]
    base = np.stack([(x + 3 * t) % 256, (y * 2 + t) % 256, ((x + y) // 2) % 256], -1).astype(np.float32)
    array = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="fovlm-throughput-"))
    pool = [frame_jpeg(rng, t) for t in range(64)]  # distinct frames, reused across clips
    jpegs = []
    per_shard = 100
    for s in range(0, args.clips, per_shard):
        samples = []
        for i in range(s, min(args.clips, s + per_shard)):
            frames = {f"{t:03d}.jpg": pool[(i * 8 + t) % len(pool)] for t in range(8)}
            jpegs += frames.values()
            samples.append(
                {
                    "__key__": f"clip{i:05d}",
                    "json": {
                        "source": "openvid",
                        "media": "video",
                        "caption": f"A synthetic clip number {i} moving right.",
                        "duration": 8.0,
                    },
                    **frames,
                }
            )
        write_shard(root / f"clips-{s // per_shard:03d}.tar", samples)
    mb = sum(len(j) for j in jpegs) / 1e6
    print(
        f"{args.clips} clips x 8 frames, {len(jpegs)} JPEGs, {mb:.1f} MB, "
        f"mean {1e3 * mb / len(jpegs):.1f} KB/frame"
    )

    t0 = time.perf_counter()
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
    pil = len(jpegs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for data in jpegs:
        decode_image(data, 224)
    ours = len(jpegs) / (time.perf_counter() - t0)
    print(
        f"one process: PIL decode {pil:.0f} frames/s; "
        f"decode_image {ours:.0f} frames/s ({ours / 8:.1f} clips/s)"
    )

    dm = SFTDataModule(
        train_shards=str(root / "clips-*.tar"),
        tokenizer=str(prepare_smollm2()),
        batch_size=args.batch_size,
        num_workers=args.workers,
        text_ratio=0.0,
        index_cache=str(root / "index"),
        shuffle_buffer=100,
    )
    dm.setup("fit")
    # As a Trainer receives the batches (uint8 frames, normalised on the device afterwards), and with the
    # normalisation done by the loader in this process (what a plain loop over train_dataloader() gets).
    for label, finalize in (
        ("uint8 frames (as under a Trainer)", None),
        ("normalised in the main process", True),
    ):
        loader = dm.train_dataloader()
        if finalize is None:
            loader.finalize = None
        it = iter(loader)
        first = next(it)
        t0 = time.perf_counter()
        samples = frames = 0
        for batch in it:
            samples += len(batch["key"])
            frames += int(batch["num_frames"].sum())
        dt = time.perf_counter() - t0
        assert samples + len(first["key"]) == args.clips and dm.skip_counts() == {}
        print(
            f"SFTDataModule, {args.workers} workers, batch {args.batch_size}, {label}: {samples / dt:.1f} "
            f"samples/s, {frames / dt:.0f} frames/s (first batch excluded; {os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
