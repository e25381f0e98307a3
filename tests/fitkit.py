"""Helpers for the fit tests: a tiny synthetic shard set, `fovlm fit` arguments, TensorBoard event reading, and a
callback that records what each rank trained on."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The test runs: the stage configs' callbacks at test intervals (checkpoint every 4 steps), and the demo overlay's
# model with a tiny random DINOv2 instead of the real one (trained, so its gradients are exercised too).
TEST_OVERLAY = """\
trainer:
  enable_progress_bar: false
  log_every_n_steps: 1
  callbacks:
    - class_path: fovlm.callbacks.StageCheckpoint
      init_args: {filename: best, monitor: auto, mode: min, save_top_k: 1, save_last: true,
                  every_n_train_steps: 4, enable_version_counter: false}
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
      init_args: {logging_interval: step}
    - class_path: fovlm.callbacks.Preemption
    - class_path: fovlm.callbacks.RandomState
    - class_path: fovlm.callbacks.SmoothedLoss
      init_args: {window: 5}
    - class_path: fovlm.callbacks.Throughput
      init_args: {window: 3}
    - class_path: fovlm.callbacks.DataStats
      init_args: {every_n_steps: 2}
    - class_path: fovlm.callbacks.AttentionMonitor
      init_args: {every_n_steps: EVERY, num_frames: 2}
    - class_path: fovlm.callbacks.SampleGeneration
      init_args: {every_n_steps: EVERY, max_new_tokens: 4}
model:
  init_args:
    vision: tiny
    vision_init_range: 0.2
    lr_vision: 1.0e-3
data:
  init_args:
    frame_size: 56
    max_frames: 8
    batch_size: 4
    num_workers: 0
    max_length: 128
"""


def synthetic_data(root: Path) -> Path:
    """A tiny synthetic shard set under ``root`` (made once; later calls reuse it): 56 px JPEG frames, 2-3 s."""
    from data_prep.media import MediaOptions
    from data_prep.synthetic import SyntheticConfig, generate

    if (root / "manifest.json").is_file():
        return root
    config = SyntheticConfig(
        caption_train=24, caption_val=4, sft_train=16, sft_val=0, text_train=8, text_val=0,
        preference_train=12, preference_val=0, mcq=0, min_seconds=2, max_seconds=3, width=64, height=64,
        look_warmup=0, look_train=0, look_val=0, look_test=0, look_preference=0,
    )
    generate(root, config, MediaOptions(size=56, keep_mp4=False), workers=0, progress=False)
    return root


STAGE_DATA = {
    1: {"train_shards": "caption/train/*.tar", "val_shards": "caption/val/*.tar", "text_shards": "text/train/*.tar"},
    2: {"train_shards": "sft/train/*.tar", "text_shards": "text/train/*.tar"},
    3: {"train_shards": "preference/train/*.tar"},
}


def fit_args(
    stage: int, data: Path, out: Path, steps: int, every: int = 1000, extra: list[str] | None = None,
    record: Path | None = None,
) -> list[str]:
    """Arguments of ``fovlm fit`` for a tiny run of ``stage`` on the synthetic set, logging under ``out``
    (``record``: also write each rank's trained sample keys and final weights there, see RecordBatches)."""
    overlay = out / "test_overlay.yaml"
    out.mkdir(parents=True, exist_ok=True)
    text = TEST_OVERLAY.replace("EVERY", str(every))
    if record is not None:
        text = text.replace("model:\n", f"    - class_path: fitkit.RecordBatches\n      init_args: {{out: {record}}}\nmodel:\n")
    overlay.write_text(text)
    args = [
        "fit",
        "--config", str(CONFIGS / f"stage{stage}.yaml"),
        "--config", str(CONFIGS / "demo.yaml"),
        "--config", str(overlay),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.max_steps", str(steps),
    ]
    for key, pattern in STAGE_DATA[stage].items():
        args += [f"--data.init_args.{key}", str(data / pattern)]
    return args + (extra or [])


def fovlm_command(args: list[str]) -> list[str]:
    """The ``fovlm`` console script as a subprocess command."""
    return [sys.executable, "-m", "fovlm", *args]


def subprocess_env() -> dict[str, str]:
    """Environment of a test subprocess: offline, tests/ importable (for :class:`RecordBatches`)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JSONARGPARSE_DEPRECATION_WARNINGS="off", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    return env


def run_fit(args: list[str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``fovlm`` with ``args`` to the end, its output in ``log``."""
    with open(log, "w") as out:
        return subprocess.run(fovlm_command(args), env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout)


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll ``predicate`` until it holds; fail (killing ``process``) if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"fovlm exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def checkpoint_step(path: Path) -> int:
    """The global step stored in a checkpoint (loading it also proves it is complete)."""
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def read_events(log_dir: Path) -> dict[str, Any]:
    """Every scalar (tag -> {step: value}, later files winning), image tag and text tag in a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    images: set[str] = set()
    texts: set[str] = set()
    files = sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        images.update(tags["images"])
        texts.update(t for t in tags["tensors"] if t.endswith("text_summary") or "/" in t)
    return {"scalars": scalars, "images": images, "texts": texts}


def weights_fingerprint(module: pl.LightningModule) -> str:
    """SHA-256 of the trained model's parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(module.model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RecordBatches(pl.Callback):
    """Writes, per rank, the sample keys it trained on and a fingerprint of its final weights to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.keys: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Keys repeat across shard sets (caption/000000.tar and text/000000.tar), sources do not.
        self.keys.extend(f"{trainer.current_epoch}/{s}/{k}" for s, k in zip(batch["source"], batch["key"]))

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(self.out) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"keys": self.keys, "weights": weights_fingerprint(pl_module),
                                    "world_size": trainer.world_size, "step": trainer.global_step}))
