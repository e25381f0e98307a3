"""``python -m fovlm.bench.dpo_cache``: the cached-reference DPO section of ``make bench`` on its own.

At one size and precision, on the batches of ``make bench`` (2 clips x 8 frames, 64 text tokens a side): the SFT
step, the DPO step with its reference model and the DPO step reading cached reference log-probabilities
(:mod:`fovlm.reference_logps`), each step time against the SFT step's next to the FLOP ratio of the two steps, and
the bytes of the models each DPO module holds. ``--memory`` adds the peak resident memory (``VmHWM``) of a fresh
process per configuration (``sft``, ``dpo``, ``dpo_cached``), each building only its own module and running the
same steps. On a shared machine the times are noisy: the run's load average is reported with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from fovlm.bench import inputs, runner, training
from fovlm.bench.flops import ModelShape
from fovlm.bench.measure import Env, matmul_peaks
from fovlm.bench.table import print_table

CONFIGS = ("sft", "dpo", "dpo_cached")


def batches(size: str, dry_run: bool, vocab: int) -> tuple[dict[str, Any], dict, dict]:
    """``make bench``'s plan at ``size`` and its 8-frame SFT batch and preference batch (fixed seeds)."""
    p = runner.plan(size, dry_run)
    batch8 = inputs.sft_batch(p["batch_frames"], p["text"], p["image"], vocab)
    pairs = inputs.preference_batch(p["batch_frames"], p["text"], p["image"], vocab, seed=2)
    return p, batch8, pairs


def section(size: str, precision: str, folder: Path, dry_run: bool = False, num_queries: int = 1) -> dict[str, Any]:
    """SFT, DPO and cached-reference DPO steps at one size and precision; the weights and the cache go to
    ``folder`` (where :func:`probe` finds them)."""
    device = torch.device("cpu")
    peak = matmul_peaks(Env(device, "fp32"), 256 if dry_run else 1024, 0.3 if dry_run else 1.0)[precision]
    runner.log(f"{size}: building the SFT, DPO and cached-reference DPO modules")
    sft = inputs.build_module(size, "answer_only", device, num_queries=num_queries)
    dpo = inputs.build_module(size, "dpo", device, num_queries=num_queries)
    shape = ModelShape.of(sft.model)
    p, batch8, pairs = batches(size, dry_run, shape.vocab)
    cached = training.cached_reference_module(size, dpo, pairs, folder, device, num_queries=num_queries)
    flop8 = training.step_flops(shape, batch8, sft.loss_head)
    flop_dpo = training.step_flops(shape, pairs, dpo.loss_head, dpo=True)
    flop_cached = training.step_flops(shape, pairs, dpo.loss_head, dpo=True, reference=False)
    env = Env(device, precision)
    res: dict[str, Any] = {}
    for name, module, batch, flop in (("sft8", sft, batch8, flop8), ("dpo", dpo, pairs, flop_dpo)):
        runner.log(f"{size}/{precision}: {name}")
        optimizer = inputs.make_optimizer(module, fused=True)
        res[name] = runner.train_config(env, module, optimizer, training.ce_loss(module), batch, flop, peak,
                                        p["steps"], p["warmup"])
    runner.log(f"{size}/{precision}: dpo from cached reference log-probabilities")
    held = (training.module_bytes(cached), training.module_bytes(dpo))
    res["dpo_cached"] = runner.cached_dpo_step(env, cached, res, pairs, flop_cached, flop8, peak, p, held)
    return res


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` of its own address space (``ru_maxrss`` would also
    count the parent's resident set at the fork that started it)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(config: str, size: str, precision: str, folder: Path, dry_run: bool) -> dict[str, Any]:
    """One configuration in this process: build only its module, run the section's steps, peak RSS."""
    device = torch.device("cpu")
    init = {"init_from": str(folder / "reference.pt")}
    if config == "sft":
        module = inputs.build_module(size, "answer_only", device)
    else:
        cache = {"reference_logps": str(folder / "reference-logps")} if config == "dpo_cached" else {}
        module = inputs.build_module(size, "dpo", device, **init, **cache)
    p, batch8, pairs = batches(size, dry_run, module.model.llm.config.vocab_size)
    optimizer = inputs.make_optimizer(module, fused=True)
    timing = training.train_steps(Env(device, precision), module, optimizer, training.ce_loss(module),
                                  batch8 if config == "sft" else pairs, p["steps"], p["warmup"])
    return {"config": config, "step_s": timing["step_s"], "module_bytes": training.module_bytes(module),
            "peak_rss_bytes": peak_rss()}


def memory(size: str, precision: str, folder: Path, dry_run: bool) -> dict[str, Any]:
    """Peak RSS of a fresh process per configuration (see :func:`probe`)."""
    out = {}
    for config in CONFIGS:
        runner.log(f"{size}/{precision}: peak memory of {config} in a fresh process")
        args = [sys.executable, "-m", "fovlm.bench.dpo_cache", "--child", config, "--sizes", size,
                "--precisions", precision, "--folder", str(folder)] + (["--dry-run"] if dry_run else [])
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{config}: {done.stderr[-2000:]}")
        out[config] = json.loads(done.stdout.strip().splitlines()[-1])
    out["dpo_cached_vs_dpo_peak"] = out["dpo_cached"]["peak_rss_bytes"] / out["dpo"]["peak_rss_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovlm.bench.dpo_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny", help="comma-separated: tiny, real")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--memory", action="store_true", help="also the peak RSS of a fresh process per configuration")
    parser.add_argument("--out", default="bench/results/dpo_cache.json", help="JSON report path")
    parser.add_argument("--dry-run", action="store_true", help="minimal repeats: checks the code paths")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes, precisions = args.sizes.split(","), args.precisions.split(",")
    if args.child:
        print(json.dumps(probe(args.child, sizes[0], precisions[0], Path(args.folder), args.dry_run)))
        return 0
    results: dict[str, Any] = {"meta": runner.meta(args.dry_run)}
    for size in sizes:
        results[size] = {}
        with tempfile.TemporaryDirectory(prefix="fovlm-bench-") as tmp:
            for precision in precisions:
                results[size][precision] = section(size, precision, Path(tmp), args.dry_run)
                if args.memory:
                    results[size][precision]["memory"] = memory(size, precision, Path(tmp), args.dry_run)
    results["meta"]["load_average_end"] = os.getloadavg()
    runner.save(results, Path(args.out))
    rows = training.cached_dpo_rows(results) + memory_rows(results)
    print_table(rows)
    print(f"wrote {args.out} (load average {results['meta']['load_average_start']} -> "
          f"{results['meta']['load_average_end']})")
    return 0


def memory_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Peak RSS per configuration of the ``--memory`` runs."""
    rows = []
    for size in inputs.SIZES:
        for precision, r in results.get(size, {}).items():
            m = r.get("memory")
            if m:
                rows.append((f"{size}/{precision} peak RSS of a process: SFT / DPO / DPO cached",
                             " / ".join(f"{m[c]['peak_rss_bytes'] / 2**30:.2f}" for c in CONFIGS)
                             + f" GiB (cached / DPO {m['dpo_cached_vs_dpo_peak']:.3g})"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
