"""``python -m fovlm.bench``: the CPU benchmark behind ``make bench`` (table on stdout, JSON under bench/results).

What it measures is described in :mod:`fovlm.bench.runner`; the matmul rates the achieved FLOP/s are compared
with are measured first, in the same process, with large square ``torch.matmul`` calls in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fovlm.bench import runner
from fovlm.bench.inputs import SIZES
from fovlm.bench.measure import Env, matmul_peaks, thread_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovlm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,real", help="comma-separated: tiny, real")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--out", default="bench/results/cpu.json", help="JSON report path")
    parser.add_argument("--no-data", action="store_true", help="skip the DataModule section")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul for the peak rate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--num-queries", type=int, default=1, help="visual tokens per frame k of the models measured")
    parser.add_argument("--dry-run", action="store_true", help="tiny size, minimal repeats: checks the code paths")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = ["tiny"] if args.dry_run else [s for s in args.sizes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    for name in sizes:
        if name not in SIZES:
            parser.error(f"unknown size {name!r}; expected tiny or real")
    for name in precisions:
        if name not in ("fp32", "bf16"):
            parser.error(f"unknown precision {name!r}; expected fp32 or bf16")
    started = time.time()
    results = {"meta": runner.meta(args.dry_run)}
    cpu = Env(torch.device("cpu"), "fp32")
    runner.log("matmul peak")
    seconds, size = (0.3, 256) if args.dry_run else (3.0, args.matmul_size)
    results["matmul"] = matmul_peaks(cpu, size, seconds)
    if not args.dry_run:
        runner.log("thread check")
        results["threads"] = thread_check()
    for name in sizes:
        results[name] = runner.run_size(name, precisions, results["matmul"], args.dry_run, torch.device("cpu"),
                                        args.num_queries)
        runner.save(results, Path(args.out))  # partial report: a long run interrupted later keeps what it measured
    # Measured again at the end: on a shared machine the first measurement may have been taken under load; the
    # shares of the matmul rate use the better of the two.
    runner.log("matmul peak, again")
    results["matmul_end"] = matmul_peaks(cpu, size, seconds)
    runner.rescale_to_best_peak(results)
    runner.finish(results, Path(args.out), started, args.dry_run, None if args.no_data else (0, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
