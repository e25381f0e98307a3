"""Stop signals and data-loader workers: a stop request is the training process's to handle, never a worker's.

Schedulers and terminals deliver a stop to a whole process group (SLURM's ``scancel`` and preemption signal every
process of the job, ``timeout`` and Ctrl-C signal the foreground group). Left to PyTorch's defaults a loader
worker dies of it at once, the main process then fails with "DataLoader worker ... is killed by signal" before
it can write its checkpoint. So, in every worker of a :class:`~fovlm.data.stream.ShardLoader`:

- the stop signals (:data:`STOP_SIGNALS`) are blocked from the moment the worker is forked (the main thread
  blocks them while it starts workers, and a child inherits its parent's signal mask), so they can never
  interrupt a worker; the main process receives its own copy of the signal and decides (see
  ``fovlm.callbacks.Preemption``);
- one thread waits for SIGTERM with ``sigwaitinfo``: sent by the worker's parent (the loader terminating a
  worker that does not shut down in time, as ``multiprocessing.Process.terminate`` does), the worker exits at
  once with code 0, as PyTorch's own worker handler does; sent by anyone else it is ignored.

A worker that really fails (an exception, a segmentation fault, SIGKILL from the out-of-memory killer) is still
reported by the loader as before.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
"""Signals that may ask a run to stop (the ones ``Preemption`` can listen to); loader workers never act on them."""


def _stop_signal_numbers() -> set[int]:
    return {getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)}


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in the calling thread for the duration (processes forked meanwhile inherit the
    mask). A signal that arrives meanwhile stays pending and is delivered when the block is lifted. Outside the
    main thread, or where signal masks do not exist, this does nothing."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signal_numbers())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _await_parent_terminate(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def shield_worker_from_stop_signals() -> None:
    """In a loader worker: keep the stop signals blocked and exit only on a SIGTERM from the parent process.

    Threads started later inherit the mask, so no thread of the worker runs a stop signal's default action."""
    if not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signal_numbers())
    threading.Thread(
        target=_await_parent_terminate, args=(os.getppid(),), name="fovlm-stop-signals", daemon=True
    ).start()


class WorkerInit:
    """A loader's ``worker_init_fn``: shields the worker from stop signals, then runs ``then`` (the user's own
    ``worker_init_fn``, if any) with the worker id. Picklable, so it also works with the spawn start method."""

    def __init__(self, then: Callable[[int], Any] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        shield_worker_from_stop_signals()
        if self.then is not None:
            self.then(worker_id)
