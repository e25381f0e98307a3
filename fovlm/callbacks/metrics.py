"""Logged training quantities: the smoothed loss, throughput and the data pipeline's counts.

- ``SmoothedLoss``: ``train/loss_smooth``, an exponential moving average of the per-step training loss (averaged
  over ranks), the quantity the "best" checkpoint is chosen by when there is no validation set; never one
  micro-batch.
- ``Throughput``: samples/s, frames/s and text tokens/s over a window of recent batches measured in this process
  only, so neither a resume nor a validation pause distorts it.
- ``DataStats``: the data pipeline's skipped (and truncated / padded) samples, by reason, over the whole run.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fovlm.callbacks.common import StepBoundary, log_scalars, require_positive


def _training_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> torch.Tensor | None:
    """The micro-batch's training loss as the module computed it (undoing Lightning's division by accumulation)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor):
        return None
    loss = loss.detach().float()
    if pl_module.automatic_optimization:
        loss = loss * trainer.accumulate_grad_batches
    return loss


class SmoothedLoss(StepBoundary):
    """Log ``train/loss_smooth``: a bias-corrected exponential moving average of the per-step training loss.

    Each optimizer step contributes the mean loss of its micro-batches, averaged over ranks, so every rank holds
    the same value (ModelCheckpoint decides "best" identically everywhere). The average spans about ``window``
    steps, so the "best" checkpoint is never chosen on one lucky micro-batch.

    Args:
        window: effective averaging span in optimizer steps (EMA weight ``2 / (window + 1)``).
        name: the logged metric's name.
    """

    def __init__(self, window: int = 100, name: str = "train/loss_smooth") -> None:
        require_positive("window", window)
        self.window = window
        self.name = name
        self.alpha = 2.0 / (window + 1)
        self.ema = 0.0
        self.weight = 0.0  # sum of the EMA weights so far (bias correction)
        self._step_losses: list[torch.Tensor] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _training_loss(trainer, pl_module, outputs)
        if loss is not None:
            self._step_losses.append(loss)
        if not self.ended_step(trainer) or not self._step_losses:
            return
        step_loss = torch.stack(self._step_losses).mean()
        self._step_losses = []
        step_loss = trainer.strategy.reduce(step_loss.to(pl_module.device), reduce_op="mean")
        value = float(step_loss)
        if not np.isfinite(value):
            return  # a non-finite step is the module's to report; it must not poison the average
        self.ema = (1 - self.alpha) * self.ema + self.alpha * value
        self.weight = (1 - self.alpha) * self.weight + self.alpha
        pl_module.log(self.name, self.ema / self.weight, on_step=True, on_epoch=False, prog_bar=True)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "weight": self.weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = float(state_dict["ema"])
        self.weight = float(state_dict["weight"])


def batch_counts(batch: Any) -> tuple[int, int, int]:
    """(samples, frames, text tokens) of a caption/SFT or preference batch; tokens count every real text token."""
    num_frames = batch["num_frames"]
    samples = int(num_frames.numel())
    frames = int(num_frames.sum())
    if "attention_mask" in batch:
        tokens = int(batch["attention_mask"].sum())
    else:
        tokens = int(batch["chosen_attention_mask"].sum()) + int(batch["rejected_attention_mask"].sum())
    return samples, frames, tokens


class Throughput(Callback):
    """Log samples/s, frames/s and text tokens/s over the last ``window`` training batches (all ranks together).

    Rates come from wall-clock time between batch ends in this process, so a resumed run starts measuring
    afresh instead of dividing the checkpoint's sample count by the new process's age; the window is cleared
    around validation so evaluation time does not count as training time.

    Args:
        window: number of recent batches the rates are measured over.
    """

    def __init__(self, window: int = 20) -> None:
        require_positive("window", window)
        self.window = window
        self._marks: deque[tuple[float, int, int, int]] = deque(maxlen=window + 1)

    def _reset(self) -> None:
        self._marks.clear()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        samples, frames, tokens = batch_counts(batch)
        self._marks.append((time.perf_counter(), samples, frames, tokens))
        if len(self._marks) < 2:
            return  # the first batch's time includes loader start-up: it only opens the window
        elapsed = self._marks[-1][0] - self._marks[0][0]
        if elapsed <= 0:
            return
        # The first mark only opens the window; the batches after it are the ones timed.
        timed = list(self._marks)[1:]
        world = trainer.world_size
        rates = {
            "perf/samples_per_s": world * sum(m[1] for m in timed) / elapsed,
            "perf/frames_per_s": world * sum(m[2] for m in timed) / elapsed,
            "perf/tokens_per_s": world * sum(m[3] for m in timed) / elapsed,
        }
        pl_module.log_dict(rates, on_step=True, on_epoch=False)


# Counted by the pipeline but not skipped: truncated texts and samples repeated to even out ranks' batch counts.
NOT_SKIPPED = ("truncated", "padded")


class DataStats(Callback):
    """Log the data pipeline's counts of skipped (and truncated / padded) samples, by reason, as ``data/<reason>``,
    and their sum over the skip reasons as ``data/skipped``.

    The counts come from ``trainer.datamodule.skip_counts()`` (summed over the loader workers of this process)
    and are cumulative over the whole run: the totals at a checkpoint are carried into the resumed run.

    Args:
        every_n_steps: log every this many optimizer steps.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        require_positive("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.base: dict[str, int] = {}

    def totals(self, trainer: pl.Trainer) -> dict[str, int]:
        """Run-wide counts so far: those carried from the checkpoint plus this process's."""
        datamodule = trainer.datamodule
        current = datamodule.skip_counts() if hasattr(datamodule, "skip_counts") else {}
        keys = set(self.base) | set(current)
        return {k: int(self.base.get(k, 0)) + int(current.get(k, 0)) for k in sorted(keys)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            counts = self.totals(trainer)
            metrics = {f"data/{reason}": float(n) for reason, n in counts.items()}
            # Always present (0 on clean data), so a dashboard shows that skipping is being watched.
            metrics["data/skipped"] = float(sum(n for r, n in counts.items() if r not in NOT_SKIPPED))
            log_scalars(trainer, metrics)

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        return {"counts": self.totals(trainer) if trainer is not None else dict(self.base)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base = {k: int(v) for k, v in state_dict.get("counts", {}).items()}
