"""Checkpoint writing, preemption and exact resume.

- ``AtomicCheckpointIO``: every checkpoint is written to a temporary file in the target folder, fsynced and then
  renamed over the target (``os.replace``), so a process killed at any moment, even with SIGKILL in the middle
  of a write, leaves the previous checkpoint intact and loadable. (Lightning's own writer goes through an fsspec
  transaction that stages the file in the system temp folder and moves it with ``shutil.move``, which is a
  copy, not a rename, across file systems, and never fsyncs.)
- ``StageCheckpoint``: ModelCheckpoint whose "best" metric is the validation loss when there is a validation set,
  else the smoothed training loss.
- ``Preemption``: SIGTERM, SIGINT and SIGUSR1, sent to the training process alone or to its whole process group,
  set a flag; at the next optimizer-step boundary every rank agrees to stop, the ``last`` checkpoint is written
  (model, optimizer, schedule, loop and data-loader position, callback state including the random generators)
  and the run ends cleanly with exit code 0. Stopping only on a step
  boundary keeps a half-accumulated gradient out of the checkpoint, so the resumed run is the same run. Under
  SLURM with auto-requeue, SIGUSR1 is left to Lightning's own handler (HPC checkpoint plus ``scontrol
  requeue``).
- ``RandomState``: the Python, NumPy and torch generators go into the checkpoint and are restored right before
  the first resumed batch.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from fovlm.callbacks.common import StepBoundary
from fovlm.data.workers import STOP_SIGNALS
from fovlm.rank_state import gather_by_rank, is_gathered, pick_rank

# ---------------------------------------------------------------------------------------------------------------
# Checkpoint writing


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, flush + fsync, ``os.replace``.

    The rename is atomic on POSIX file systems, so ``path`` holds either the old or the new complete file. The
    folder is fsynced after the rename so the new directory entry survives a crash too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name, so the file object knows its path
    try:
        with open(tmp_name, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer whose saves are atomic (see :func:`atomic_torch_save`).

    Temporary files left by a process killed mid-write (``.NAME.XXXX.tmp``) are ignored by ``--ckpt_path last``
    (they do not match ``last*.ckpt``) and are removed by the next save into the same folder.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
            stale.unlink(missing_ok=True)
        atomic_torch_save(checkpoint, path)


# ---------------------------------------------------------------------------------------------------------------
# Preemption and exact resume


def _last_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first ModelCheckpoint that keeps a ``last`` checkpoint (the one ``--ckpt_path last`` finds)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            return callback
    return None


class StageCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose "best" metric follows the stage's data: ``val/loss`` when a validation set is
    configured (the DataModule has ``val_shards`` and ``trainer.limit_val_batches`` is not 0), else the smoothed
    training loss ``train/loss_smooth`` (see :class:`SmoothedLoss`), never one micro-batch's loss.

    With a validation metric the best checkpoint is also reconsidered right after every validation run, so it
    never waits a whole checkpoint interval for the newest validation loss. All other arguments are
    ModelCheckpoint's; with ``filename: best``, ``save_top_k: 1`` and ``enable_version_counter: false`` the
    selected checkpoint is always ``<dirpath>/best.ckpt`` next to ``last.ckpt``.

    Args:
        monitor: ``auto`` (the rule above) or an explicit metric name.
        val_monitor: the metric chosen by ``auto`` when there is a validation set.
        train_monitor: the metric chosen by ``auto`` otherwise.
        kwargs: ModelCheckpoint's arguments.
    """

    def __init__(
        self,
        monitor: str = "auto",
        val_monitor: str = "val/loss",
        train_monitor: str = "train/loss_smooth",
        **kwargs: Any,
    ) -> None:
        super().__init__(monitor=None if monitor == "auto" else monitor, **kwargs)
        self.auto_monitor = monitor == "auto"
        self.val_monitor = val_monitor
        self.train_monitor = train_monitor

    @staticmethod
    def has_validation(trainer: pl.Trainer) -> bool:
        """Whether this run validates: a DataModule with validation shards and validation batches allowed."""
        datamodule = trainer.datamodule
        return getattr(datamodule, "val_shards", None) is not None and trainer.limit_val_batches != 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.auto_monitor:
            self.monitor = self.val_monitor if self.has_validation(trainer) else self.train_monitor
            rank_zero_info(f"best checkpoint selected by {self.monitor}")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say which weights the run starts from: a resumed checkpoint, the init_from weights, or neither."""
        init_from = pl_module.hparams.get("init_from") if hasattr(pl_module, "hparams") else None
        if trainer.ckpt_path:
            message = f"Resumed the full training state at step {trainer.global_step} from {trainer.ckpt_path}"
            if init_from:
                message += (
                    f"; it supersedes init_from={init_from} for the trained model"
                    " (a DPO reference model still comes from init_from)"
                )
        elif init_from:
            message = f"Started from the weights of init_from={init_from}"
        else:
            message = "Started from the configured backbone weights (no init_from, no checkpoint to resume)"
        rank_zero_info(message)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        # Before the first validation the monitored value does not exist yet. ModelCheckpoint would then put off
        # last.ckpt too until a validation has run; a preemptible run needs it every N steps regardless.
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.monitor != self.val_monitor or trainer.sanity_checking or self.save_top_k == 0:
            return
        candidates = self._monitor_candidates(trainer)
        if candidates.get(self.monitor) is not None and not trainer.fast_dev_run:
            self._save_topk_checkpoint(trainer, candidates)


class Preemption(StepBoundary):
    """Save the ``last`` checkpoint and stop cleanly when the job is asked to stop (SIGTERM, SIGINT, SIGUSR1).

    The signal handler only sets a flag. After each optimizer step the ranks combine their flags (any rank that
    was signalled stops them all, so a signal delivered to one process is enough); then the ``last`` checkpoint
    of the run's ModelCheckpoint is written and ``trainer.should_stop`` ends the fit. Resume with
    ``fovlm fit ... --ckpt_path last``.

    A stop sent to the whole process group (``scancel``, ``timeout``, Ctrl-C) ends the same way: the data-loader
    workers leave stop signals to the main process (:mod:`fovlm.data.workers`). Further stop signals while the
    checkpoint is written are counted and otherwise ignored; the write itself is atomic, so even SIGKILL leaves
    the previous ``last.ckpt`` intact.

    Args:
        signals: names of the signals that request a stop (a subset of ``fovlm.data.workers.STOP_SIGNALS``).
            SIGUSR1 is what SLURM sends ahead of the time limit with ``#SBATCH --signal=USR1@90``.
    """

    def __init__(self, signals: list[str] | None = None) -> None:
        names = ["SIGTERM", "SIGINT", "SIGUSR1"] if signals is None else signals
        for name in names:
            if name not in STOP_SIGNALS or not hasattr(signal, name):
                raise ValueError(f"signal {name!r} cannot request a stop; choose among {', '.join(STOP_SIGNALS)}")
        self.signals = names
        self.requested: str | None = None
        self.repeated = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
        else:
            self.repeated += 1

    def _install(self, trainer: pl.Trainer) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        for name in self.signals:
            signum = getattr(signal, name)
            # Lightning's SLURM handler saves an HPC checkpoint and requeues the job: leave it in charge.
            if slurm_requeue and signum == (environment.requeue_signal or signal.SIGUSR1):
                continue
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its own handlers, so ours are the ones that run.
        self.requested = None
        self.repeated = 0
        self._install(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.ended_step(trainer):
            return  # inside a gradient accumulation: never stop with half-accumulated gradients
        stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if not stop:
            return
        callback = _last_checkpoint_callback(trainer)
        if callback is None or callback.dirpath is None:
            raise RuntimeError("a stop was requested but no ModelCheckpoint(save_last=True) is configured")
        path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        # Tell ModelCheckpoint this step is saved so its own end-of-batch / end-of-fit saves do not repeat it.
        callback._last_global_step_saved = trainer.global_step
        callback._last_checkpoint_saved = True
        callback.last_model_path = path
        trainer.should_stop = True
        ignored = f" ({self.repeated} further stop signals ignored)" if self.repeated else ""
        rank_zero_info(
            f"Stop requested ({self.requested or 'by another rank'}): saved {path} at step {trainer.global_step}; "
            f"resume with --ckpt_path last{ignored}"
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


class RandomState(Callback):
    """Keep the Python, NumPy and torch (CPU and CUDA) random generators of every rank in the checkpoint.

    Each rank's states at the moment of the save are gathered into the checkpoint (rank 0 writes it); on resume
    each rank gets its own back, right before the first resumed training batch, the point at which the
    uninterrupted run had the same states.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Plain tensors, ints and tuples only, so the checkpoint loads with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return gather_by_rank({
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        })

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints written before the states were kept per rank hold rank 0's states, used by every rank.
        self._pending = pick_rank(state_dict, "random state") if is_gathered(state_dict) else state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
