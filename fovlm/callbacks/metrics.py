"""Logged training quantities: the smoothed loss, throughput and the data pipeline's counts.

- ``SmoothedLoss``: ``train/loss_smooth``, an exponential moving average of the per-step training loss (averaged
  over ranks), the quantity the "best" checkpoint is chosen by when there is no validation set; never one
  micro-batch.
- ``Throughput``: samples/s, frames/s and text tokens/s over a window of recent batches measured in this process
  only, so neither a resume nor a validation pause distorts it.
- ``DataStats``: the data pipeline's skipped (and truncated / padded) samples, by reason, summed over all ranks,
  training (over the whole run) and validation (per validation run) apart.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fovlm.callbacks.common import StepBoundary, log_scalars, require_positive
from fovlm.rank_state import RANKS_KEY, gather_by_rank


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

# Counted from the shard index, which every process builds whole when it sets up: the same on every rank and again
# in a resumed run, so these are taken once (the largest), never added up.
PER_PROCESS = ("damaged_shard",)


def combine(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The counts of several disjoint parts of a run (ranks, or a checkpoint's totals and this process's) added up,
    by reason; :data:`PER_PROCESS` reasons, which every part counts alike, are taken once."""
    parts = list(parts)
    reasons = sorted({reason for part in parts for reason in part})
    return {
        reason: (max if reason in PER_PROCESS else sum)(int(part.get(reason, 0)) for part in parts)
        for reason in reasons
    }


def sum_over_ranks(counts: Mapping[str, int]) -> dict[str, int]:
    """This rank's counts combined with every other rank's (:func:`combine`); the reasons may differ between ranks.

    A collective under a process group: every rank must call it, at the same point. Without one it returns
    ``counts`` itself.
    """
    return combine(gather_by_rank(dict(counts))[RANKS_KEY])


def count_metrics(counts: Mapping[str, int], split: str) -> dict[str, float]:
    """``data/<reason>/<split>`` for every counted reason and ``data/skipped/<split>``, their sum over the skip
    reasons (always present, 0 on clean data, so a dashboard shows that skipping is being watched)."""
    metrics = {f"data/{reason}/{split}": float(n) for reason, n in counts.items()}
    metrics[f"data/skipped/{split}"] = float(sum(n for r, n in counts.items() if r not in NOT_SKIPPED))
    return metrics


def _split_counts(trainer: pl.Trainer, split: str) -> dict[str, int]:
    """This process's counts of ``split`` so far (none when the DataModule keeps no counts)."""
    datamodule = trainer.datamodule
    if not hasattr(datamodule, "skip_counts"):
        return {}
    return {reason: int(n) for reason, n in datamodule.skip_counts(split).items()}


def _validation_run_counts(trainer: pl.Trainer) -> dict[str, int]:
    """This process's counts of the validation run that just ended: what its loaders read in this run (a loader
    counts each iteration apart, so reads of the validation set outside the run, e.g. by the monitors, are left
    out), with the validation shard index's :data:`PER_PROCESS` counts."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        loaders = []
    elif isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    counts: Counter[str] = Counter()
    for loader in loaders:
        counts.update(getattr(loader, "iteration_counts", {}))
    index = {reason: n for reason, n in _split_counts(trainer, "val").items() if reason in PER_PROCESS}
    return {reason: int(n) for reason, n in counts.items() if reason not in PER_PROCESS} | index


class DataStats(StepBoundary):
    """Log the data pipeline's counts of skipped (and truncated / padded) samples, summed over all ranks, with
    training and validation kept apart: ``data/<reason>/<split>`` by reason and ``data/skipped/<split>``, their
    sum over the skip reasons, for ``<split>`` ``train`` and ``val``.

    Each rank's counts (summed over its loader workers) are gathered from every rank before rank 0 logs them.
    Training counts come from ``trainer.datamodule.skip_counts("train")`` and are cumulative over the whole run
    (the totals at a checkpoint are carried into the resumed run), logged every ``every_n_steps`` optimizer steps.
    Validation reads the same samples each time, so its counts are those of one validation run (the validation
    loaders' ``iteration_counts``), logged when it ends; the sanity check's are not logged. ``damaged_shard``
    counts shards, once (every rank indexes every shard).

    Args:
        every_n_steps: log the training counts every this many optimizer steps.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        require_positive("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.base: dict[str, int] = {}
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def training_totals(self, trainer: pl.Trainer) -> dict[str, int]:
        """Run-wide training counts so far: those carried from the checkpoint plus every rank's (a collective)."""
        return combine([self.base, sum_over_ranks(_split_counts(trainer, "train"))])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every rank ends the same optimizer steps, so every rank joins the gathering at the same point.
        if self.ended_step(trainer) and trainer.global_step % self.every_n_steps == 0:
            log_scalars(trainer, count_metrics(self.training_totals(trainer), "train"))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            log_scalars(trainer, count_metrics(sum_over_ranks(_validation_run_counts(trainer)), "val"))

    def state_dict(self) -> dict[str, Any]:
        """The run-wide training counts (a collective under DDP: Lightning calls it on every rank when it saves)."""
        totals = self.training_totals(self._trainer) if self._trainer is not None else dict(self.base)
        return {"train": totals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints written before the splits were kept apart hold one total of both, under "counts".
        counts = state_dict.get("train", state_dict.get("counts", {}))
        self.base = {reason: int(n) for reason, n in counts.items()}
