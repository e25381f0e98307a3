"""Training-step sections: the loss variants timed against each other, timed steps, FLOPs and rates.

The module's own loss head (per-sample layout, lm_head over the scored rows only) is measured against the
naive padded layout (:func:`fovlm.bench.naive.padded_coarse_fine_logits`) and against the lm_head over every
text position. A timed configuration reports samples/s and the achieved model FLOP/s as a share of the matmul
rate measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from torch import Tensor

from fovlm.bench import flops
from fovlm.bench.measure import Env
from fovlm.bench.naive import padded_coarse_fine_logits
from fovlm.losses import selected_targets, shift_labels, token_nll


def ce_loss(module) -> Callable[[dict], Tensor]:
    """The module's own loss head on a batch (coarse_fine)."""
    return lambda batch: module.loss_head(module.model, batch, mode=module.mode, reference=module.reference).loss


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


def step_flops(shape: flops.ModelShape, batch: dict, loss_head, dpo: bool = False, frozen_vision: bool = False) -> float:
    """Model FLOPs of one training step on ``batch`` (see :mod:`fovlm.bench.flops`)."""
    num_frames = batch["num_frames"].tolist()
    if dpo:
        lengths, scored = {}, 0
        for side in ("chosen", "rejected"):
            lengths[side] = batch[f"{side}_attention_mask"].sum(1).tolist()
            labels = shift_labels(batch[f"{side}_input_ids"], loss_head.score_mask(batch[f"{side}_roles"]))
            scored += int((labels != -100).sum())
        return flops.dpo_step(shape, num_frames, lengths["chosen"], lengths["rejected"], scored)
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
