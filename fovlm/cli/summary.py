"""``fovlm summary RUN_DIR...``: each run's first and last training loss, read from its TensorBoard events."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def read_scalars(log_dir: str | os.PathLike, tag: str) -> dict[int, float]:
    """One scalar's values by step from every TensorBoard event file in ``log_dir`` (a resumed run's files are
    read in the order they were written, so a step logged twice keeps its latest value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


def summarize_run(log_dir: str | os.PathLike, tag: str = "train/loss", span: int = 5) -> dict[str, Any]:
    """First and last value of ``tag`` in a run folder, each the mean over ``span`` logged steps (one step's loss
    is noisy), plus the validation loss at its first and last evaluation when there is one."""
    values = read_scalars(log_dir, tag)
    if not values:
        raise ValueError(f"no {tag!r} scalars in {log_dir} (is it a TensorBoard run folder of fovlm fit?)")
    steps = sorted(values)
    span = max(1, min(span, len(steps) // 2 or 1))
    summary: dict[str, Any] = {
        "log_dir": str(log_dir),
        "steps": steps[-1] + 1,
        "first": sum(values[s] for s in steps[:span]) / span,
        "last": sum(values[s] for s in steps[-span:]) / span,
        "span": span,
    }
    val = read_scalars(log_dir, "val/loss")
    if val:
        summary["val_first"], summary["val_last"] = val[min(val)], val[max(val)]
    return summary


def main(argv: list[str]) -> int:
    """``fovlm summary RUN_DIR...``: each run's first and last training loss and where its TensorBoard logs are."""
    parser = argparse.ArgumentParser(prog="fovlm summary", description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (the TensorBoard log folders, e.g. runs/stage1)")
    parser.add_argument("--span", type=int, default=5, help="logged steps averaged for 'first' and 'last'")
    args = parser.parse_args(argv)
    failed = 0
    for run in args.runs:
        try:
            s = summarize_run(run, span=args.span)
        except ValueError as error:
            print(f"{run}: {error}", file=sys.stderr)
            failed += 1
            continue
        line = (
            f"{Path(run).name}: {s['steps']} steps, train/loss {s['first']:.3f} -> {s['last']:.3f} "
            f"(means of the first and last {s['span']} steps)"
        )
        if "val_first" in s:
            line += f", val/loss {s['val_first']:.3f} -> {s['val_last']:.3f}"
        print(line)
    logdir = os.path.relpath(os.path.commonpath([os.path.abspath(Path(r).parent) for r in args.runs]))
    print(f"TensorBoard logs: {', '.join(args.runs)}  (view: tensorboard --logdir {logdir})")
    return 1 if failed else 0
