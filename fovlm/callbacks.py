"""Training callbacks and the checkpoint writer: preemption, exact resume, smoothed loss, throughput, monitoring.

- ``AtomicCheckpointIO``: every checkpoint is written to a temporary file in the target folder, fsynced and then
  renamed over the target (``os.replace``), so a process killed at any moment, even with SIGKILL in the middle
  of a write, leaves the previous checkpoint intact and loadable. (Lightning's own writer goes through an fsspec
  transaction that stages the file in the system temp folder and moves it with ``shutil.move``, which is a
  copy, not a rename, across file systems, and never fsyncs.)
- ``Preemption``: SIGTERM, SIGINT and SIGUSR1, sent to the training process alone or to its whole process group,
  set a flag; at the next optimizer-step boundary every rank agrees to stop, the ``last`` checkpoint is written
  (model, optimizer, schedule, loop and data-loader position, callback state including the random generators)
  and the run ends cleanly with exit code 0. Stopping only on a step
  boundary keeps a half-accumulated gradient out of the checkpoint, so the resumed run is the same run. Under
  SLURM with auto-requeue, SIGUSR1 is left to Lightning's own handler (HPC checkpoint plus ``scontrol
  requeue``).
- ``RandomState``: the Python, NumPy and torch generators go into the checkpoint and are restored right before
  the first resumed batch.
- ``SmoothedLoss``: ``train/loss_smooth``, an exponential moving average of the per-step training loss (averaged
  over ranks), the quantity the "best" checkpoint is chosen by when there is no validation set; never one
  micro-batch.
- ``Throughput``: samples/s, frames/s and text tokens/s over a window of recent batches measured in this process
  only, so neither a resume nor a validation pause distorts it.
- ``DataStats``, ``AttentionMonitor`` and ``SampleGeneration``: the data pipeline's skipped-sample counts, the
  attention maps and entropies of the static and dynamic queries, and a generated answer for a fixed sample.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from fovlm.data.workers import STOP_SIGNALS
from fovlm.rank_state import gather_by_rank, is_gathered, pick_rank

log = logging.getLogger(__name__)


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
                    " (a DPO reference still comes from init_from)"
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


class Preemption(Callback):
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
        self._step_at_batch_start = -1

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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
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


# ---------------------------------------------------------------------------------------------------------------
# Logged quantities


def _training_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> torch.Tensor | None:
    """The micro-batch's training loss as the module computed it (undoing Lightning's division by accumulation)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor):
        return None
    loss = loss.detach().float()
    if pl_module.automatic_optimization:
        loss = loss * trainer.accumulate_grad_batches
    return loss


class SmoothedLoss(Callback):
    """Log ``train/loss_smooth``: a bias-corrected exponential moving average of the per-step training loss.

    Each optimizer step contributes the mean loss of its micro-batches, averaged over ranks, so every rank holds
    the same value (ModelCheckpoint decides "best" identically everywhere). The average spans about ``window``
    steps, so the "best" checkpoint is never chosen on one lucky micro-batch.

    Args:
        window: effective averaging span in optimizer steps (EMA weight ``2 / (window + 1)``).
        name: the logged metric's name.
    """

    def __init__(self, window: int = 100, name: str = "train/loss_smooth") -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.name = name
        self.alpha = 2.0 / (window + 1)
        self.ema = 0.0
        self.weight = 0.0  # sum of the EMA weights so far (bias correction)
        self._step_losses: list[torch.Tensor] = []
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _training_loss(trainer, pl_module, outputs)
        if loss is not None:
            self._step_losses.append(loss)
        if trainer.global_step == self._step_at_batch_start or not self._step_losses:
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
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
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


# ---------------------------------------------------------------------------------------------------------------
# Monitoring: data pipeline counts, attention maps, sample generations


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the run's TensorBoardLogger (rank 0 only), or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (its count of stepped batches before this one), so
    values written directly line up with ``self.log`` values of the same optimizer step."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write scalars straight to the loggers at the current step (not subject to log_every_n_steps)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_logger_step(trainer))


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
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
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
            _log_scalars(trainer, metrics)

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        return {"counts": self.totals(trainer) if trainer is not None else dict(self.base)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base = {k: int(v) for k, v in state_dict.get("counts", {}).items()}


class _RandomStatesKept:
    """Context manager: whatever runs inside leaves the Python, NumPy and torch CPU generators as it found them
    (building a loader iterator draws a seed from torch's generator, which would change the training run)."""

    def __enter__(self) -> _RandomStatesKept:
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


def _single_sample(batch: dict[str, Any], index: int) -> dict[str, Any]:
    """Sample ``index`` of a caption/SFT or preference batch: its frames [T, 3, H, W] and its text rows (CPU)."""
    num_frames = batch["num_frames"].cpu()
    start = int(num_frames[:index].sum())
    count = int(num_frames[index])
    sample = {"frames": batch["frames"][start : start + count].detach().cpu()}  # [T, 3, H, W]
    prefix = "chosen_" if "chosen_input_ids" in batch else ""
    mask = batch[f"{prefix}attention_mask"][index].bool().cpu()
    sample["input_ids"] = batch[f"{prefix}input_ids"][index].cpu()[mask]  # [S]
    sample["roles"] = batch[f"{prefix}roles"][index].cpu()[mask]  # [S]
    return sample


def _first_video_sample(batch: Any) -> dict[str, Any] | None:
    """The first sample with frames in a batch, or None."""
    if not isinstance(batch, dict) or "num_frames" not in batch:
        return None
    with_frames = (batch["num_frames"] > 0).nonzero()
    return _single_sample(batch, int(with_frames[0])) if len(with_frames) else None


class _FixedSample(Callback):
    """Base of the callbacks that look at one fixed sample: the first video sample of the validation set when
    there is one, else the first video sample this process trains on. Fetching it leaves the random
    generators untouched, so monitoring never changes what is trained."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.sample: dict[str, Any] | None = None
        self._looked_at_val = False
        self._step_at_batch_start = -1

    def _val_sample(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        with _RandomStatesKept():
            loader = datamodule.val_dataloader()
            if not loader:
                return None
            for batch in loader:
                # The hook a training batch goes through after reaching the device (frames uint8 -> normalised).
                sample = _first_video_sample(datamodule.on_after_batch_transfer(batch, 0))
                if sample is not None:
                    return sample
        return None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._step_at_batch_start
        if not stepped or trainer.global_step % self.every_n_steps != 0:
            if self.sample is None and self._looked_at_val:
                self.sample = _first_video_sample(batch)
            return
        if self.sample is None and not self._looked_at_val:
            self._looked_at_val = True
            self.sample = self._val_sample(trainer)
        if self.sample is None:
            self.sample = _first_video_sample(batch)
        if self.sample is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), _RandomStatesKept():
                self.observe(trainer, pl_module, self.sample)
        finally:
            pl_module.train(was_training)

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sample: dict[str, Any]) -> None:
        raise NotImplementedError


class AttentionMonitor(_FixedSample):
    """Every ``every_n_steps`` steps: where the static and the dynamic (LLM-written) queries look, on a fixed
    sample, as a TensorBoard image ``attention/maps`` (one row per query kind, one column per frame, heads and
    layers averaged), and the mean attention entropy of each kind (``attention/entropy_static``,
    ``attention/entropy_dynamic``, nats over the CLS token and the patches; uniform attention is ln(keys)).

    Args:
        every_n_steps: optimizer steps between two looks.
        num_frames: frames drawn (the first ones of the sample).
    """

    def __init__(self, every_n_steps: int = 500, num_frames: int = 4) -> None:
        super().__init__(every_n_steps)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sample: dict[str, Any]) -> None:
        from fovlm.eval.attention import attention_entropy, attention_sheet

        model = pl_module.model
        device = next(model.parameters()).device
        frames = sample["frames"].to(device)  # [T, 3, H, W]
        num_frames = torch.tensor([len(frames)], device=device)
        visual = model.visual_tokens(model.encode_patches(frames), num_frames, "coarse_fine", return_attention=True)
        maps = {
            # per layer [T, h, 1, K] -> [T, L, h, K]
            "static": torch.stack(visual.coarse_attention, dim=1).squeeze(3).float().cpu(),
            "dynamic": torch.stack(visual.fine_attention, dim=1).squeeze(3).float().cpu(),
        }
        _log_scalars(
            trainer,
            {f"attention/entropy_{kind}": float(attention_entropy(w).mean()) for kind, w in maps.items()},
        )
        writer = _tensorboard(trainer)
        if writer is not None:
            shown = min(self.num_frames, len(frames))
            sheet = attention_sheet(
                list(sample["frames"][:shown]), {k: w[:shown] for k, w in maps.items()}, layer=None, cell=128
            )
            writer.add_image("attention/maps", np.asarray(sheet), _logger_step(trainer), dataformats="HWC")


class SampleGeneration(_FixedSample):
    """Every ``every_n_steps`` steps: a greedy answer to a fixed sample's first question, generated with the
    autoregressive visual pass (``fovlm.model.generate.generate``), as TensorBoard text ``samples/generation``
    together with the prompt and the reference answer.

    Args:
        every_n_steps: optimizer steps between two generations.
        max_new_tokens: most tokens generated.
    """

    def __init__(self, every_n_steps: int = 1000, max_new_tokens: int = 48) -> None:
        super().__init__(every_n_steps)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sample: dict[str, Any]) -> None:
        from fovlm.losses import ROLE_ANSWER
        from fovlm.model.generate import generate

        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        answer = (sample["roles"] == ROLE_ANSWER).nonzero()
        if tokenizer is None or not len(answer):
            return
        start = int(answer[0])
        end = start
        while end < len(sample["roles"]) and int(sample["roles"][end]) == ROLE_ANSWER:
            end += 1
        prompt_ids = sample["input_ids"][:start]  # [P]: up to and including "<|im_start|>assistant\n"
        reference = sample["input_ids"][start:end]  # the answer and its <|im_end|>
        model = pl_module.model
        device = next(model.parameters()).device
        stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        result = generate(
            model, sample["frames"].to(device), prompt_ids.to(device), stop_ids, max_new_tokens=self.max_new_tokens
        )
        writer = _tensorboard(trainer)
        if writer is None:
            return
        prompt = tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=False)
        text = (
            f"**frames:** {len(sample['frames'])}  \n"
            f"**prompt:** `{prompt.strip()}`  \n"
            f"**reference:** {tokenizer.decode(reference.tolist(), skip_special_tokens=True).strip()}  \n"
            f"**generated:** {tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()}"
        )
        writer.add_text("samples/generation", text, _logger_step(trainer))
