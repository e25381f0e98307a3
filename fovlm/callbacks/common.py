"""What several callbacks share: the optimizer-step boundary, argument checks, and writing straight to the loggers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def require_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` unless the count ``value`` (the argument called ``name``) is at least 1."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class StepBoundary(Callback):
    """Base of the callbacks that act only when a training batch ends an optimizer step.

    The optimizer step count is noted when each batch starts; :meth:`ended_step` then tells, when the batch ends,
    whether it moved. It does not move on a batch inside a gradient accumulation (nor on a step the optimizer
    skipped), so a subclass never acts on half-accumulated gradients.
    """

    _step_at_batch_start = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def ended_step(self, trainer: pl.Trainer) -> bool:
        """Whether the training batch that just ended made an optimizer step."""
        return trainer.global_step != self._step_at_batch_start


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the run's TensorBoardLogger (rank 0 only), or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (its count of stepped batches before this one), so
    values written directly line up with ``self.log`` values of the same optimizer step."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write scalars straight to the loggers at the current step (not subject to log_every_n_steps)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logger_step(trainer))
