"""Training callbacks and the checkpoint writer: preemption, exact resume, smoothed loss, throughput, monitoring.

- :mod:`fovlm.callbacks.checkpointing`: ``AtomicCheckpointIO`` (every save written to a temporary file, fsynced and
  renamed over the target, so even SIGKILL mid-write leaves the previous checkpoint loadable), ``StageCheckpoint``
  (the "best" checkpoint by validation loss, or by the smoothed training loss without a validation set),
  ``Preemption`` (a stop signal ends the run at the next optimizer-step boundary with the ``last`` checkpoint
  written) and ``RandomState`` (every rank's random generators kept in the checkpoint for an exact resume).
- :mod:`fovlm.callbacks.metrics`: ``SmoothedLoss`` (``train/loss_smooth``, a bias-corrected moving average of the
  per-step loss), ``Throughput`` (samples, frames and text tokens per second) and ``DataStats`` (the data
  pipeline's skipped-sample counts).
- :mod:`fovlm.callbacks.monitors`: ``AttentionMonitor`` (the attention maps and entropies of the coarse and fine
  queries) and ``SampleGeneration`` (a generated answer), both on one fixed sample.
- :mod:`fovlm.callbacks.common`: the optimizer-step boundary and the logging helpers they share.

Every callback is importable from here, as the configs name them (``fovlm.callbacks.SmoothedLoss``).
"""

from fovlm.callbacks.checkpointing import (
    AtomicCheckpointIO,
    Preemption,
    RandomState,
    StageCheckpoint,
    atomic_torch_save,
)
from fovlm.callbacks.common import StepBoundary
from fovlm.callbacks.metrics import DataStats, SmoothedLoss, Throughput, batch_counts
from fovlm.callbacks.monitors import AttentionMonitor, SampleGeneration

__all__ = [
    "AtomicCheckpointIO",
    "AttentionMonitor",
    "DataStats",
    "Preemption",
    "RandomState",
    "SampleGeneration",
    "SmoothedLoss",
    "StageCheckpoint",
    "StepBoundary",
    "Throughput",
    "atomic_torch_save",
    "batch_counts",
]
