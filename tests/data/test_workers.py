"""Loader workers leave stop signals to the main process, exit when their parent terminates them, and still
report a real failure."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from fovlm.data.workers import STOP_SIGNALS, WorkerInit, stop_signals_blocked


class SlowCount(IterableDataset):
    """0..n-1, split between workers, a little slowly so that a signal lands while a worker is busy."""

    def __init__(self, n: int, delay: float = 0.01):
        self.n = n
        self.delay = delay

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, self.n, step):
            time.sleep(self.delay)
            yield i


def _loader(n: int = 400, workers: int = 2) -> DataLoader:
    return DataLoader(SlowCount(n), batch_size=None, num_workers=workers, worker_init_fn=WorkerInit())


def _iterate_with_blocked_start(loader: DataLoader):
    with stop_signals_blocked():  # as ShardLoader starts its workers
        return iter(loader)


def _kill_from_outside(pid: int, name: str) -> None:
    """Send ``name`` from another process (as a scheduler or a terminal does), not from the worker's parent."""
    subprocess.run(["kill", "-s", name.removeprefix("SIG"), str(pid)], check=True)


def test_stop_signals_from_outside_leave_workers_running():
    loader = _loader()
    iterator = _iterate_with_blocked_start(loader)
    seen = [next(iterator) for _ in range(10)]
    for worker in iterator._workers:
        for name in STOP_SIGNALS:
            _kill_from_outside(worker.pid, name)
    seen += list(iterator)
    assert sorted(seen) == list(range(400))


def test_a_terminate_from_the_parent_ends_the_worker_with_code_zero():
    iterator = _iterate_with_blocked_start(_loader(n=10_000))
    next(iterator)
    worker = iterator._workers[0]
    _kill_from_outside(worker.pid, "SIGTERM")  # ignored
    time.sleep(0.2)
    assert worker.is_alive()
    worker.terminate()  # what the loader does to a worker that does not shut down in time
    worker.join(timeout=10)
    assert worker.exitcode == 0
    iterator._shutdown_workers()


def test_a_killed_worker_is_still_reported():
    iterator = _iterate_with_blocked_start(_loader(n=10_000))
    next(iterator)
    _kill_from_outside(iterator._workers[1].pid, "SIGKILL")
    with pytest.raises(RuntimeError, match=r"DataLoader worker .*(killed by signal|exited unexpectedly)"):
        for _ in iterator:
            pass


def test_a_signal_while_blocked_reaches_the_main_process_afterwards():
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with stop_signals_blocked():
            signal.raise_signal(signal.SIGUSR2)
            assert received == []
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_users_worker_init_fn_still_runs(tmp_path):
    def mark(worker_id: int) -> None:
        (tmp_path / f"worker{worker_id}").touch()

    loader = DataLoader(SlowCount(8, delay=0), batch_size=None, num_workers=2, worker_init_fn=WorkerInit(mark))
    assert sorted(loader) == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker0", "worker1"]
