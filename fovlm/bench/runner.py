"""What the CPU and GPU benchmark runs share: the plan per size, the sections at one size, the report.

At a size (``tiny``: hidden 64 / 2 layers; ``real``: random DINOv2-small geometry + the real
SmolLM2-135M-Instruct) and precision (fp32; bf16 autocast over fp32 weights) :func:`run_size` measures training
samples/s for coarse_fine SFT on 8-frame clips, on a batch of mixed 1-64 frame clips and for DPO (with its
reference model, and from cached reference log-probabilities holding one model: :func:`cached_dpo_step`), with
the peak RSS (and peak device memory on CUDA) of each and the achieved model FLOP/s (:mod:`fovlm.bench.flops`)
against the matmul rate measured in the same run; the autoregressive time per frame at 8-64 frames; greedy
generation tokens/s; 3-mode multiple-choice scoring. Each design choice is timed against its naive version
in the same run (:mod:`fovlm.bench.naive`): padded vs per-sample layout, K/V projected twice vs once, the
autoregressive pass with a rebuilt cache or a recomputed LLM prefix vs cached, per-option vs shared scoring,
and the lm_head over every text position vs the scored rows only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fovlm.bench import inputs, mix, training
from fovlm.bench.answering import generation_figures, scoring_figures
from fovlm.bench.data_loading import data_figures
from fovlm.bench.encoding import autoregressive_figures, kv_once_vs_twice
from fovlm.bench.flops import ModelShape
from fovlm.bench.measure import Env, PeakRSS, timed
from fovlm.bench.table import print_table, summary_rows
from fovlm.data.contract import FRAME_SETTINGS
from fovlm.model.attention import resolve

PACK_TOKENS = 1024  # the packed rows' token budget timed and counted (docs/measured.md#packing)
PACKINGS = {"unpacked": None, "packed": PACK_TOKENS}


def plan(size: str, dry_run: bool, device: str = "cpu") -> dict[str, Any]:
    """How much of each section to run (small at real size on the CPU, so the whole run stays ~10 min)."""
    if dry_run:
        return dict(steps=1, warmup=1, batch_frames=(2, 2), mixed=(1, 3), text=32, image=FRAME_SETTINGS.frame_size, ar=(2, 4),
                    ar_naive=(2, 4), ar_repeats=1, ar_warmup=1, kv_frames=2, kv_repeats=1, gen_tokens=4, score_frames=2,
                    naive_precisions=("fp32", "bf16"), full_padding=True, mix=(4, 1, 0))
    if device == "cuda":
        return dict(steps=5, warmup=2, batch_frames=(8, 8), mixed=(1, 8, 64), text=64, image=FRAME_SETTINGS.frame_size,
                    ar=(8, 16, 32, 64), ar_naive=(8, 64), ar_repeats=3, ar_warmup=1, kv_frames=64, kv_repeats=5, gen_tokens=64,
                    score_frames=8, naive_precisions=("bf16",), full_padding=True, mix=(32, 3, 1))
    if size == "tiny":
        return dict(steps=3, warmup=1, batch_frames=(8, 8), mixed=(1, 8, 64), text=64, image=FRAME_SETTINGS.frame_size,
                    ar=(8, 16, 32, 64), ar_naive=(8, 64), ar_repeats=3, ar_warmup=1, kv_frames=16, kv_repeats=3, gen_tokens=32,
                    score_frames=8, naive_precisions=("fp32", "bf16"), full_padding=True, mix=(32, 2, 1))
    return dict(steps=2, warmup=1, batch_frames=(8, 8), mixed=(1, 8, 64), text=64, image=FRAME_SETTINGS.frame_size, ar=(8, 16, 32, 64),
                ar_naive=(8, 64), ar_repeats=1, ar_warmup=0, kv_frames=8, kv_repeats=1, gen_tokens=32, score_frames=8,
                naive_precisions=("bf16",), full_padding=False, mix=(8, 1, 1))


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train_config(env: Env, module, optimizer, loss_fn, batch: dict, flop: float, peak: float, steps: int,
                 warmup: int = 1) -> dict[str, float]:
    """Time one training configuration under a peak-RSS watch (and the peak device memory on CUDA)."""
    batch = inputs.to_device(batch, env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    with PeakRSS() as rss:
        timing = training.train_steps(env, module, optimizer, loss_fn, batch, steps, warmup)
    out = {**training.training_figures(timing, len(batch["num_frames"]), flop, peak), "peak_rss_bytes": rss.peak,
           "rss_before_bytes": rss.start}
    if env.device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(env.device)
    return out


def run_size(size: str, precisions: list[str], peaks: dict[str, float], dry_run: bool,
             device: torch.device, num_queries: int = 1) -> dict[str, Any]:
    """Every model section at one size, with ``num_queries`` visual tokens per frame; ``peaks`` holds the
    measured matmul FLOP/s per precision."""
    p = plan(size, dry_run, device.type)
    log(f"{size}: building models ({num_queries} queries per frame)")
    sft = inputs.build_module(size, "answer_only", device, num_queries=num_queries)
    frozen = inputs.build_module(size, "answer_only", device, lr_vision=0.0, num_queries=num_queries)  # frozen
    dpo = inputs.build_module(size, "dpo", device, num_queries=num_queries)
    shape = ModelShape.of(sft.model)
    vocab = shape.vocab
    # Fused AdamW, as FoveatedModule.configure_optimizers builds it (the optimizer section times both kernels).
    sft_opt = inputs.make_optimizer(sft, fused=True)
    frozen_opt = inputs.make_optimizer(frozen, fused=True)
    dpo_opt = inputs.make_optimizer(dpo, fused=True)
    batch8 = inputs.sft_batch(p["batch_frames"], p["text"], p["image"], vocab)
    mixed = inputs.sft_batch(p["mixed"], p["text"], p["image"], vocab, seed=1)
    pairs = inputs.preference_batch(p["batch_frames"], p["text"], p["image"], vocab, seed=2)
    flop8 = training.step_flops(shape, batch8, sft.loss_head)
    flop8_frozen = training.step_flops(shape, batch8, sft.loss_head, frozen_vision=True)
    flop_mixed = training.step_flops(shape, mixed, sft.loss_head)
    flop_dpo = training.step_flops(shape, pairs, dpo.loss_head, dpo=True)
    flop_dpo_cached = training.step_flops(shape, pairs, dpo.loss_head, dpo=True, reference=False)
    with tempfile.TemporaryDirectory(prefix="fovlm-bench-") as tmp:  # the cache is read into the module
        dpo_cached = training.cached_reference_module(size, dpo, inputs.to_device(pairs, device), Path(tmp), device,
                                                      num_queries=num_queries)
    held = (training.module_bytes(dpo_cached), training.module_bytes(dpo))
    out: dict[str, Any] = {"shape": shape.__dict__, "batches": {
        "sft8_num_frames": list(p["batch_frames"]), "mixed_num_frames": list(p["mixed"]), "text_tokens": p["text"]}}
    out["padding"] = {name: mix.padding_figures(name, mix.BATCH_SIZES[name], num_queries, PACKINGS,
                                                batches=20 if dry_run else 200) for name in mix.MIXES}
    for precision in precisions:
        env = Env(device, precision)
        peak = peaks[precision]
        res: dict[str, Any] = {}
        log(f"{size}/{precision}: training sft 8 frames")
        res["sft8"] = train_config(env, sft, sft_opt, training.ce_loss(sft), batch8, flop8, peak, p["steps"], p["warmup"])
        if precision == "bf16" and resolve("auto", torch.zeros(1, 1, 257, 1, dtype=torch.bfloat16, device=device)) != "sdpa":
            log(f"{size}/{precision}: training sft 8 frames, SDPA in the patch pass")
            res["sft8_sdpa_attention"] = sdpa_kernel_step(env, sft, sft_opt, batch8, flop8, peak, p, res["sft8"])
        log(f"{size}/{precision}: training sft 8 frames, frozen vision")
        res["sft8_frozen_vision"] = train_config(env, frozen, frozen_opt, training.ce_loss(frozen), batch8,
                                                 flop8_frozen, peak, p["steps"], p["warmup"])
        res["sft8_frozen_vision"]["step_vs_trained_vision"] = res["sft8_frozen_vision"]["step_s"] / res["sft8"]["step_s"]
        log(f"{size}/{precision}: training mixed {p['mixed']}")
        res["mixed"] = train_config(env, sft, sft_opt, training.ce_loss(sft), mixed, flop_mixed, peak, 1, warmup=0)
        log(f"{size}/{precision}: training dpo")
        res["dpo"] = train_config(env, dpo, dpo_opt, training.ce_loss(dpo), pairs, flop_dpo, peak, p["steps"], p["warmup"])
        res["dpo"]["step_vs_sft8_step"] = res["dpo"]["step_s"] / res["sft8"]["step_s"]
        log(f"{size}/{precision}: packed vs unpacked on a stage-2 mix of {p['mix'][0]}")
        res["packing"] = packing_steps(env, sft, sft_opt, shape, p, peak)
        log(f"{size}/{precision}: training dpo from cached reference log-probabilities")
        res["dpo_cached"] = cached_dpo_step(env, dpo_cached, res, pairs, flop_dpo_cached, flop8, peak, p, held)
        # The naive ways reproduce the fVLM original's one-token layout: compared at k = 1 only.
        compare_naive = precision in p["naive_precisions"] and num_queries == 1
        if compare_naive:
            naive_sections(env, f"{size}/{precision}", sft, sft_opt, (batch8, mixed), (flop8, flop_mixed), peak, p, res)
        log(f"{size}/{precision}: autoregressive")
        naive_counts = p["ar_naive"] if compare_naive else ()
        res["autoregressive"] = autoregressive_figures(env, sft.model, p["ar"], naive_counts, p["image"],
                                                       p["ar_repeats"], p["ar_warmup"])
        log(f"{size}/{precision}: generation")
        res["generation"] = generation_figures(env, sft.model, p["batch_frames"][0], 40, p["gen_tokens"],
                                               p["image"], vocab)
        log(f"{size}/{precision}: scoring")
        res["scoring"] = scoring_figures(env, sft.model, p["score_frames"], 4, p["image"], vocab,
                                         naive=precision in p["naive_precisions"])
        out[precision] = res
    log(f"{size}: optimizer step, fused vs foreach")
    out["optimizer"] = optimizer_figures(sft, inputs.to_device(batch8, device), device)
    return out


def cached_dpo_step(env: Env, module, res: dict[str, Any], pairs: dict, flop: float, flop_sft: float, peak: float,
                    p: dict[str, Any], held: tuple[int, int]) -> dict[str, Any]:
    """The DPO step reading cached reference log-probabilities (one model held) against the SFT step and the
    online DPO step timed in ``res``; ``held``: model bytes of the cached and the online DPO module."""
    optimizer = inputs.make_optimizer(module, fused=True)
    timing = train_config(env, module, optimizer, training.ce_loss(module), pairs, flop, peak, p["steps"], p["warmup"])
    return training.cached_dpo_figures(timing, res["dpo"], res["sft8"], flop_sft, *held)


def naive_sections(env: Env, tag: str, sft, sft_opt, batches: tuple[dict, dict], flop: tuple[float, float],
                   peak: float, p: dict[str, Any], res: dict[str, Any]) -> None:
    """The naive ways against fovlm's (padded layout, lm_head over every position, K/V twice) into ``res``;
    ``batches`` and ``flop``: the 8-frame and the mixed batch; ``tag``: size/precision in the progress lines."""
    (batch8, mixed), (flop8, flop_mixed) = batches, flop
    log(f"{tag}: naive padded layout on the mixed batch")
    res["mixed_padded"] = train_config(env, sft, sft_opt, training.padded_ce_loss(sft, False), mixed,
                                       flop_mixed, peak, 1, warmup=0)
    res["mixed_padded"]["ratio_vs_per_sample"] = res["mixed_padded"]["step_s"] / res["mixed"]["step_s"]
    if p["full_padding"]:
        res["mixed_padded_frames_encoded"] = train_config(
            env, sft, sft_opt, training.padded_ce_loss(sft, True), mixed, flop_mixed, peak, 1, warmup=0)
        res["mixed_padded_frames_encoded"]["ratio_vs_per_sample"] = (
            res["mixed_padded_frames_encoded"]["step_s"] / res["mixed"]["step_s"])
    log(f"{tag}: lm_head over every text position")
    res["sft8_full_lm_head"] = train_config(env, sft, sft_opt, training.full_lm_head_ce_loss(sft), batch8,
                                            flop8, peak, 1, warmup=0)
    res["sft8_full_lm_head"]["ratio_vs_scored_rows"] = res["sft8_full_lm_head"]["step_s"] / res["sft8"]["step_s"]
    log(f"{tag}: K/V once vs twice")
    frames = torch.randn(p["kv_frames"], 3, p["image"], p["image"], device=env.device)
    res["kv"] = kv_once_vs_twice(env, sft.model, frames, p["kv_repeats"])


def sdpa_kernel_step(env: Env, module, optimizer, batch: dict, flop: float, peak: float, p: dict[str, Any],
                     auto: dict[str, float]) -> dict[str, Any]:
    """The SFT step with SDPA in the patch pass (the kernel before ``auto``), against ``auto``'s timing."""
    module.model.encoder.attention_kernel = "sdpa"
    try:
        out = train_config(env, module, optimizer, training.ce_loss(module), batch, flop, peak, p["steps"], p["warmup"])
    finally:
        module.model.encoder.attention_kernel = "auto"
    return {**out, "ratio_vs_auto": out["step_s"] / auto["step_s"]}


def packing_steps(env: Env, module, optimizer, shape: ModelShape, p: dict[str, Any], peak: float) -> dict[str, Any]:
    """SFT steps on one batch drawn from the stage-2 mix, one sample per row against packed rows."""
    batch_size, steps, warmup = p["mix"]
    batch = mix.mixed_batch("stage2", batch_size, p["image"], shape.vocab)
    flop = training.step_flops(shape, batch, module.loss_head)
    tokens = int(batch["num_frames"].sum()) * module.model.active_queries + int(batch["attention_mask"].sum())
    out: dict[str, Any] = {"num_frames": batch["num_frames"].tolist(), "text_tokens": batch["attention_mask"].sum(1).tolist()}
    for label, pack_tokens in PACKINGS.items():
        module.model.use_packing(pack_tokens)
        out[label] = train_config(env, module, optimizer, training.ce_loss(module), batch, flop, peak, steps, warmup)
        out[label]["tokens_per_s"] = tokens / out[label]["step_s"]
    module.model.use_packing(None)
    out["unpacked_vs_packed"] = out["unpacked"]["step_s"] / out["packed"]["step_s"]
    return out


def optimizer_figures(module, batch: dict, device: torch.device) -> dict[str, float]:
    """AdamW step time over the SFT parameter groups: fused kernel vs foreach (fp32 master weights)."""
    env = Env(device, "fp32")
    module.train()
    loss = training.ce_loss(module)(batch)
    loss.backward()
    out = {"parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad)}
    for name, fused in (("foreach", False), ("fused", True)):
        optimizer = inputs.make_optimizer(module, fused=fused)
        out[f"{name}_step_s"] = timed(env, optimizer.step, 3)
    out["foreach_vs_fused"] = out["foreach_step_s"] / out["fused_step_s"]
    module.model.zero_grad(set_to_none=True)
    return out


def meta(dry_run: bool) -> dict[str, Any]:
    """Where and when the run happened; the load average matters on a shared machine."""
    return {"utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "dry_run": dry_run}


def data_section(dry_run: bool, workers: tuple[int, ...]) -> dict[str, Any]:
    """DataModule samples/s against the raw decode rate, on a temporary shard of 8-frame JPEG clips."""
    from fovlm.model.loading import prepare_smollm2

    log("data: DataModule vs raw decode")
    with tempfile.TemporaryDirectory(prefix="fovlm-bench-") as tmp:
        samples = 8 if dry_run else 96
        return data_figures(Path(tmp), str(prepare_smollm2()), samples, 8, 320, 4, (0,) if dry_run else workers)


def rescale_to_best_peak(results: dict[str, Any]) -> None:
    """Set ``matmul`` to the better of the start and end measurements and recompute every share of it."""
    start, end = results["matmul"], results.pop("matmul_end")
    results["matmul_start"], results["matmul_end"] = dict(start), end
    results["matmul"] = {p: max(start[p], end[p]) for p in start}
    for size in inputs.SIZES:
        for precision, peak in results["matmul"].items():
            for figures in results.get(size, {}).get(precision, {}).values():
                if isinstance(figures, dict) and "achieved_flop_per_s" in figures:
                    figures["fraction_of_matmul_peak"] = figures["achieved_flop_per_s"] / peak


def save(results: dict[str, Any], out: Path) -> None:
    """Write the JSON report (complete or partial)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def finish(results: dict[str, Any], out: Path, started: float, dry_run: bool,
           data_workers: tuple[int, ...] | None) -> None:
    """The end of a run: the DataModule section, then the JSON report and the table.

    Args:
        results: the report so far (its ``meta`` gets the end load average and the wall time).
        out: JSON report path.
        started: ``time.time()`` when the run began.
        dry_run: the data section reads a small shard with the loader in this process only.
        data_workers: DataModule worker counts to measure; None leaves the data section out.
    """
    if data_workers is not None:
        results["data"] = data_section(dry_run, data_workers)
    results["meta"]["load_average_end"] = os.getloadavg()
    results["meta"]["wall_s"] = time.time() - started
    save(results, out)
    print_table(summary_rows(results) + training.cached_dpo_rows(results))
    print(f"wrote {out} in {results['meta']['wall_s']:.0f} s (load average {results['meta']['load_average_start']}"
          f" -> {results['meta']['load_average_end']})")
