"""A stop signal sent to the whole process group of `fovlm fit` (loader workers and every DDP rank included), as
schedulers, `timeout` and Ctrl-C send it, ends in a `last.ckpt` from which the run continues unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fitkit import (
    checkpoint_step,
    fit_args,
    fovlm_command,
    read_events,
    run_fit,
    subprocess_env,
    synthetic_data,
    wait_for,
)

STEPS = 16
WORKERS = 2
TOPOLOGY = {
    1: ["--data.init_args.num_workers", str(WORKERS)],
    2: ["--data.init_args.num_workers", str(WORKERS), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "0"],
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


@pytest.fixture(scope="module")
def reference_losses(data, tmp_path_factory):
    """Per-step training losses of uninterrupted runs, by number of ranks (computed once, when first asked)."""
    cache: dict[int, dict[int, float]] = {}

    def losses(ranks: int) -> dict[int, float]:
        if ranks not in cache:
            out = tmp_path_factory.mktemp(f"reference{ranks}")
            result = run_fit(fit_args(1, data, out, STEPS, extra=TOPOLOGY[ranks]), out / "fit.log")
            assert result.returncode == 0, (out / "fit.log").read_text()[-3000:]
            cache[ranks] = read_events(out / "stage1")["scalars"]["train/loss"]
            assert sorted(cache[ranks]) == list(range(STEPS))
        return cache[ranks]

    return losses


def _start_in_own_group(command: list[str], log: Path) -> subprocess.Popen:
    """Start ``command`` as the leader of a new process group, as a job under a scheduler or a shell is."""
    with open(log, "w") as out:
        return subprocess.Popen(command, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _descendants(process: subprocess.Popen) -> int:
    try:
        return len(psutil.Process(process.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return 0


def _stop_group_when_training(process: subprocess.Popen, last: Path, log: Path, ranks: int, *signums: int) -> None:
    """After the first periodic checkpoint, once every rank's loader workers are up, signal the whole group."""
    wait_for(last.is_file, process, log)
    wait_for(lambda: _descendants(process) >= ranks * (WORKERS + 1) - 1, process, log)
    for signum in signums:
        os.killpg(process.pid, signum)


def _assert_resume_continues_the_run(data, out: Path, ranks: int, reference: dict[int, float], log: Path) -> None:
    last = out / "stage1" / "checkpoints" / "last.ckpt"
    stopped = checkpoint_step(last)
    result = run_fit(fit_args(1, data, out, STEPS, extra=TOPOLOGY[ranks] + ["--ckpt_path", "last"]), log)
    assert result.returncode == 0, log.read_text()[-3000:]
    assert f"Resumed the full training state at step {stopped}" in log.read_text()
    assert checkpoint_step(last) == STEPS
    got = read_events(out / "stage1")["scalars"]["train/loss"]
    assert sorted(got) == list(range(STEPS))  # every step logged once, none repeated
    for step in range(STEPS):
        assert got[step] == pytest.approx(reference[step], abs=1e-6), f"step {step} (resumed at {stopped})"


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "ddp-2-ranks"])
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_process_group_ends_in_a_resumable_checkpoint(
    name, ranks, data, reference_losses, tmp_path
):
    out = tmp_path / "run"
    last = out / "stage1" / "checkpoints" / "last.ckpt"
    log = tmp_path / "interrupted.log"
    process = _start_in_own_group(fovlm_command(fit_args(1, data, out, STEPS, extra=TOPOLOGY[ranks])), log)
    _stop_group_when_training(process, last, log, ranks, getattr(signal, name))
    assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"Stop requested ({name})" in text
    assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
    stopped = checkpoint_step(last)
    assert 4 <= stopped < STEPS, f"stopped at {stopped}"
    _assert_resume_continues_the_run(data, out, ranks, reference_losses(ranks), tmp_path / "resume.log")


# Every write of last.ckpt stops half-way, signals the whole process group twice (SIGTERM, then SIGINT) and then
# finishes the file: the step-4 periodic save requests the stop (its SIGINT is a first repeat), and the stop's
# own save at step 5 is hit by two more signals.
# The signals come from a `kill` process, as from a scheduler: a SIGTERM from a worker's own parent is the
# loader terminating it.
SIGNALS_DURING_SAVE = """
import io, os, subprocess, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if ".last.ckpt." not in str(getattr(f, "name", f)):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO(); real_save(obj, buffer, *args, **kwargs); data = buffer.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    for name in ("TERM", "INT"):
        subprocess.run(["kill", "-s", name, "--", f"-{os.getpgid(0)}"])
    f.write(data[len(data) // 2 :])
torch.save = save
from fovlm.cli import main
main(sys.argv[1:])
"""


def test_stop_signals_during_the_save_do_not_corrupt_it(data, reference_losses, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "interrupted.log"
    args = fit_args(1, data, out, STEPS, extra=TOPOLOGY[1])
    process = _start_in_own_group([sys.executable, "-c", SIGNALS_DURING_SAVE, *args], log)
    assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "Stop requested (SIGTERM)" in text and "(3 further stop signals ignored)" in text, text[-3000:]
    assert checkpoint_step(out / "stage1" / "checkpoints" / "last.ckpt") == 5
    _assert_resume_continues_the_run(data, out, 1, reference_losses(1), tmp_path / "resume.log")


def test_a_worker_that_really_dies_is_reported_as_the_error_it_is(data, tmp_path):
    out = tmp_path / "run"
    last = out / "stage1" / "checkpoints" / "last.ckpt"
    log = tmp_path / "fit.log"
    process = _start_in_own_group(fovlm_command(fit_args(1, data, out, STEPS, extra=TOPOLOGY[1])), log)
    wait_for(last.is_file, process, log)
    wait_for(lambda: _descendants(process) >= WORKERS, process, log)
    psutil.Process(process.pid).children()[0].kill()  # a worker, killed as the out-of-memory killer does
    assert process.wait(timeout=180) != 0
    assert "DataLoader worker" in log.read_text() and "killed by signal: Killed" in log.read_text()
