"""Training-step sections: the loss variants timed against each other, timed steps, FLOPs and rates.

The module's own loss head (per-sample layout, lm_head over the scored rows only) is measured against the
naive padded layout (:func:`fovlm.bench.naive.padded_coarse_fine_logits`) and against the lm_head over every
text position. A timed configuration reports samples/s and the achieved model FLOP/s as a share of the matmul
rate measured in the same run. The DPO step from cached reference log-probabilities (:mod:`fovlm.reference_logps`)
is timed on a module built as training builds it from a cache (:func:`cached_reference_module`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fovlm.bench import flops, inputs
from fovlm.bench.measure import Env
from fovlm.bench.naive import padded_coarse_fine_logits
from fovlm.losses import selected_targets, shift_labels, token_nll
from fovlm.reference_logps import (
    entry_names,
    model_identity,
    needed_queries,
    part_path,
    sample_digests,
    write_manifest,
    write_part,
)


def ce_loss(module) -> Callable[[dict], Tensor]:
    """The module's own loss head on a batch (coarse_fine); DPO against its reference model or its cache."""
    cache = getattr(module, "reference_cache", None)
    reference = module.reference if cache is None else cache.view("train")
    return lambda batch: module.loss_head(module.model, batch, mode=module.mode, reference=reference).loss


def padded_ce_loss(module, encode_padding: bool) -> Callable[[dict], Tensor]:
    """The same CE with the naive padded layout (:func:`fovlm.bench.naive.padded_coarse_fine_logits`)."""

    def loss(batch: dict) -> Tensor:
        labels = shift_labels(batch["input_ids"], module.loss_head.score_mask(batch["roles"]))
        logits_mask, targets, _ = selected_targets(labels)
        logits = padded_coarse_fine_logits(module.model, batch["frames"], batch["num_frames"], batch["input_ids"],
                                           logits_mask, encode_padding=encode_padding)
        return token_nll(logits, targets).mean()

    return loss


def full_lm_head_ce_loss(module) -> Callable[[dict], Tensor]:
    """The same CE with the lm_head over every text position ([B, S, V]) and the scored rows picked after."""

    def loss(batch: dict) -> Tensor:
        labels = shift_labels(batch["input_ids"], module.loss_head.score_mask(batch["roles"]))
        logits_mask, targets, _ = selected_targets(labels)
        out = module.model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                           mode=module.mode, logits_mask=None)
        return token_nll(out.logits[logits_mask], targets).mean()

    return loss


def train_steps(env: Env, module, optimizer, loss_fn: Callable[[dict], Tensor], batch: dict, steps: int,
                warmup: int = 1) -> dict[str, float]:
    """Time full training steps (zero_grad, forward, backward, optimizer step) -> median seconds per part.

    ``step_cpu_s`` is the process CPU time of a step; against ``step_s`` x threads it shows how much of the
    cores the run had (on a shared machine).
    """
    module.train()
    parts: dict[str, list[float]] = {"forward_s": [], "backward_s": [], "optimizer_s": [], "step_s": [],
                                     "step_cpu_s": []}
    for i in range(warmup + steps):
        cpu0 = time.process_time()
        t0 = env.now()
        optimizer.zero_grad(set_to_none=True)
        with env.autocast():
            loss = loss_fn(batch)
        t1 = env.now()
        loss.backward()
        t2 = env.now()
        optimizer.step()
        t3 = env.now()
        cpu = time.process_time() - cpu0  # CPU time of this process's threads: shows how much of the wall it got
        if i >= warmup:
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, cpu), strict=True):
                parts[key].append(value)
    return {key: statistics.median(values) for key, values in parts.items()}


def step_flops(shape: flops.ModelShape, batch: dict, loss_head, dpo: bool = False, frozen_vision: bool = False,
               reference: bool = True) -> float:
    """Model FLOPs of one training step on ``batch`` (see :mod:`fovlm.bench.flops`); a DPO step without
    ``reference`` (log-probabilities from a cache) is the policy's 3 pair forwards of the 4."""
    num_frames = batch["num_frames"].tolist()
    if dpo:
        lengths, scored = {}, 0
        for side in ("chosen", "rejected"):
            lengths[side] = batch[f"{side}_attention_mask"].sum(1).tolist()
            labels = shift_labels(batch[f"{side}_input_ids"], loss_head.score_mask(batch[f"{side}_roles"]))
            scored += int((labels != -100).sum())
        step = flops.dpo_step(shape, num_frames, lengths["chosen"], lengths["rejected"], scored)
        return step if reference else step * 3 / 4
    labels = shift_labels(batch["input_ids"], loss_head.score_mask(batch["roles"]))
    return flops.train_step(shape, num_frames, batch["attention_mask"].sum(1).tolist(), int((labels != -100).sum()),
                            frozen_vision=frozen_vision)


def training_figures(timing: dict[str, float], batch_size: int, step_flop: float, peak: float) -> dict[str, float]:
    """Samples/s, achieved FLOP/s and its share of the measured matmul rate for one timed configuration."""
    return {
        **timing,
        "samples_per_s": batch_size / timing["step_s"],
        "model_flop_per_step": step_flop,
        "achieved_flop_per_s": step_flop / timing["step_s"],
        "fraction_of_matmul_peak": step_flop / timing["step_s"] / peak,
    }


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers a module holds (a DPO module with its reference model: both models)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cached_reference_module(size: str, online: Any, batch: dict, folder: Path, device: torch.device,
                            **model_kwargs: Any) -> Any:
    """A DPO module of ``size`` that reads its reference log-probabilities from a cache, as training does.

    The cache of ``batch`` is written under ``folder`` from ``online``'s reference model (the numbers
    ``fovlm reference-logps`` writes); the module is built from the same weights (``init_from``), so the cache
    fits it, and holds no reference model.

    Args:
        size: ``tiny`` or ``real``.
        online: a DPO module with its reference model (``inputs.build_module(size, "dpo", ...)``).
        batch: the preference batch the cache covers (on ``device``).
        folder: where the weights and the cache are written.
        device: where the module goes.
        model_kwargs: further arguments of the module (as given to ``online``).
    """
    reference, hp = online.reference, online.hparams
    init = folder / "reference.pt"
    torch.save(reference.state_dict(), init)
    queries = needed_queries(hp)
    with torch.no_grad():
        columns = []
        for k in queries:
            reference.use_queries(k)
            columns.append(torch.stack(online.loss_head.pair_logps(reference, batch, online.mode), dim=1))
    cache = folder / "reference-logps"
    write_part(cache, "train", 0, 1, entry_names(batch), sample_digests(batch), torch.stack(columns, dim=1))
    identity = {**model_identity(hp, online.reference_fingerprint), "precision": "bench", "data": None}
    write_manifest(cache, identity, queries, {"train": {"parts": [part_path("train", 0, 1)], "pairs": len(batch["key"])}})
    return inputs.build_module(size, "dpo", device, init_from=str(init), reference_logps=str(cache), **model_kwargs)


def cached_dpo_figures(cached: dict[str, Any], online: dict[str, Any], sft: dict[str, Any], flop_sft: float,
                       bytes_cached: int, bytes_online: int) -> dict[str, Any]:
    """The cached DPO step's timing (``cached``) with its ratios to the SFT step: time, FLOPs (3 pair forwards
    against the SFT step's 3 forwards), the time ratio over the FLOP ratio (1 when the step costs what its FLOPs
    say), the same for the online DPO step, and the model bytes held with and without the reference model."""
    step, flop = cached["step_s"] / sft["step_s"], cached["model_flop_per_step"] / flop_sft
    online_step, online_flop = online["step_s"] / sft["step_s"], online["model_flop_per_step"] / flop_sft
    return {**cached, "step_vs_sft8_step": step, "flop_vs_sft8_step": flop, "step_ratio_over_flop_ratio": step / flop,
            "online_step_vs_sft8_step": online_step, "online_flop_vs_sft8_step": online_flop,
            "online_step_vs_cached_step": online["step_s"] / cached["step_s"],
            "module_bytes": bytes_cached, "online_module_bytes": bytes_online}


def cached_dpo_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows of the cached DPO section: per size and precision, the step ratio next to the FLOP ratio and the
    models held."""
    rows, gib = [], 2**30
    for size in inputs.SIZES:
        for precision, r in results.get(size, {}).items():
            c = r.get("dpo_cached") if isinstance(r, dict) else None
            if not c:
                continue
            rows.append((f"{size}/{precision} DPO step, cached reference / SFT step",
                         f"{c['step_vs_sft8_step']:.3g} (FLOPs {c['flop_vs_sft8_step']:.3g}: time/FLOP ratio "
                         f"{c['step_ratio_over_flop_ratio']:.3g}); with the reference model "
                         f"{c['online_step_vs_sft8_step']:.3g} (FLOPs {c['online_flop_vs_sft8_step']:.3g})"))
            rows.append((f"{size}/{precision} DPO models held, cached / with the reference model",
                         f"{c['module_bytes'] / gib:.3f} / {c['online_module_bytes'] / gib:.3f} GiB, peak RSS "
                         f"+{(c['peak_rss_bytes'] - c['rss_before_bytes']) / gib:.2f} GiB in the step"
                         + (f", device {c['peak_device_bytes'] / gib:.2f} GiB" if "peak_device_bytes" in c else "")))
    return rows
