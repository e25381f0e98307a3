"""Preemption and resume on the real `fovlm fit` process: SIGTERM + `--ckpt_path last` continues the same run,
and SIGKILL at any moment (also in the middle of a checkpoint write) leaves a last checkpoint that loads."""

from __future__ import annotations

import signal
import subprocess
import time

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

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


def test_sigterm_then_resume_equals_uninterrupted_run(data, tmp_path):
    reference = tmp_path / "reference"
    result = run_fit(fit_args(1, data, reference, STEPS), tmp_path / "reference.log")
    assert result.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert checkpoint_step(reference / "stage1" / "checkpoints" / "last.ckpt") == STEPS

    out = tmp_path / "interrupted"
    last = out / "stage1" / "checkpoints" / "last.ckpt"
    log = tmp_path / "interrupted.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(fovlm_command(fit_args(1, data, out, STEPS)), env=subprocess_env(),
                                   stdout=handle, stderr=subprocess.STDOUT)
        wait_for(last.is_file, process, log)  # the step-4 checkpoint: training is under way
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = checkpoint_step(last)
    assert 4 <= stopped < STEPS, f"stopped at {stopped}"
    assert "Stop requested (SIGTERM)" in log.read_text()

    resume_log = tmp_path / "resume.log"
    result = run_fit(fit_args(1, data, out, STEPS, extra=["--ckpt_path", "last"]), resume_log)
    assert result.returncode == 0, resume_log.read_text()[-3000:]
    assert f"Resumed the full training state at step {stopped} from {last}" in resume_log.read_text()
    assert checkpoint_step(last) == STEPS

    expected = read_events(reference / "stage1")["scalars"]["train/loss"]
    got = read_events(out / "stage1")["scalars"]["train/loss"]
    assert sorted(expected) == sorted(got) == list(range(STEPS))  # every step logged once, none repeated
    for step in range(STEPS):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step} (resumed at {stopped})"
    # The resumed run's own config record sits next to the first one instead of overwriting it.
    assert (out / "stage1" / "config.yaml").is_file() and (out / "stage1" / "config-2.yaml").is_file()


DIE_IN_SECOND_LAST_WRITE = """
import io, os, signal, sys, torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    name = getattr(f, "name", str(f))
    if ".last.ckpt." in str(name):
        calls.append(name)
        if len(calls) == 2:  # the second last.ckpt: write half of it, then die like a preempted node
            buffer = io.BytesIO(); real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from fovlm.cli import main
main(sys.argv[1:])
"""


def test_sigkill_at_any_moment_leaves_a_loadable_last_checkpoint(data, tmp_path):
    import sys

    out = tmp_path / "run"
    ckpt_dir = out / "stage1" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    args = fit_args(1, data, out, STEPS)

    # 1. Killed in the middle of writing the second last.ckpt (step 8): the step-4 one is intact.
    log = tmp_path / "write.log"
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-c", DIE_IN_SECOND_LAST_WRITE, *args], env=subprocess_env(),
                                stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert checkpoint_step(last) == 4
    assert list(ckpt_dir.glob(".last.ckpt.*.tmp")), "the half-written file should be left under its temp name"

    # 2. Resumed runs killed from outside at other moments: right after a checkpoint landed, and a little later.
    for attempt, delay in enumerate((0.0, 0.3)):
        before = last.stat().st_mtime_ns
        log = tmp_path / f"kill{attempt}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(fovlm_command(args + ["--ckpt_path", "last"]), env=subprocess_env(),
                                       stdout=handle, stderr=subprocess.STDOUT)
            wait_for(lambda before=before: last.stat().st_mtime_ns != before, process, log)
            time.sleep(delay)
            process.kill()
            process.wait(timeout=60)
        step = checkpoint_step(last)  # loads: never a torn file
        assert 4 < step <= STEPS

    # 3. The chain still finishes the run.
    result = run_fit(args + ["--ckpt_path", "last"], tmp_path / "final.log")
    assert result.returncode == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert checkpoint_step(last) == STEPS
    assert not list(ckpt_dir.glob(".last.ckpt.*.tmp")), "stale temp files are cleaned by the next save"
