"""Learning-rate schedules as per-group multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

Three schedules, all with linear warmup and stepped once per optimizer step
(docs/recipe.md#learning-rate-schedules):

- ``cosine``: warmup, then a half-cosine from the group's LR down to ``min_lr_ratio`` x LR (0.1 by default).
- ``constant``: warmup, then the group's LR.
- ``converging``: warmup, then each group moves along a half-cosine from its own LR to the shared
  ``target_lr`` (down for the connector, up for the backbones); every group ends at exactly ``target_lr``.

With W warmup steps, N total steps, ``p = (t - W) / (N - W)`` and ``c(p) = (1 + cos(pi p)) / 2``, the
fVLM original's multiplier is ``f(t) = t / W`` for ``t < W``, then ``m + (1 - m) c(p)`` (m the floor ratio, or
``target_lr / lr`` for converging), and ``m`` from ``t >= N`` on.

The optimizer step with index ``s`` (0-based) runs at ``f(s + 1)``, one step ahead of the fVLM original,
which ran its first step at ``f(0) = 0``: a wasted step with LR 0. Shifting by one keeps every value of the
curve and its end points: step ``W - 1`` is the first at the full LR (the end of warmup) and the last step
``N - 1`` runs exactly at the floor / ``target_lr``.

Budget training's other per-step schedule is here too: :func:`query_budget`, the k queries per frame of a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

SCHEDULES = ("cosine", "constant", "converging")


def reference_multiplier(t: float, warmup_steps: int, total_steps: int, floor: float) -> float:
    """The fVLM original's ``f(t)``: linear warmup to 1, half-cosine from 1 to ``floor``, then ``floor``.

    ``floor`` may exceed 1 (a converging backbone group, whose LR rises to the target).
    """
    if warmup_steps > 0 and t < warmup_steps:
        return t / warmup_steps
    if t >= total_steps:
        return floor
    progress = (t - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Multiplier at optimizer step ``step`` (0-based) of warmup + cosine to ``min_lr_ratio``."""
    return reference_multiplier(step + 1, warmup_steps, total_steps, min_lr_ratio)


def constant_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier at optimizer step ``step`` of warmup + constant (``total_steps`` is unused, kept uniform)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def converging_multiplier(step: int, warmup_steps: int, total_steps: int, ratio: float) -> float:
    """Multiplier at optimizer step ``step`` of warmup + half-cosine from 1 to ``ratio = target_lr / lr``."""
    return reference_multiplier(step + 1, warmup_steps, total_steps, ratio)


def _zero(step: int) -> float:
    return 0.0


def lr_lambdas(
    schedule: str,
    base_lrs: list[float],
    total_steps: int,
    warmup_ratio: float = 0.03,
    min_lr_ratio: float = 0.1,
    target_lr: float | None = None,
) -> list[Callable[[int], float]]:
    """One ``LambdaLR`` multiplier per parameter group.

    Args:
        schedule: ``cosine``, ``constant`` or ``converging``.
        base_lrs: each group's configured LR (a group at LR 0 stays at 0 under every schedule).
        total_steps: optimizer steps of the whole run (N).
        warmup_ratio: W = int(N x warmup_ratio), as in the fVLM original.
        min_lr_ratio: floor of the cosine schedule as a fraction of each group's LR.
        target_lr: the LR every group converges to (required by ``converging``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if total_steps < 1 or not math.isfinite(total_steps):
        raise ValueError(f"the schedule needs a finite number of optimizer steps, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup_steps = int(total_steps * warmup_ratio)
    lambdas: list[Callable[[int], float]] = []
    for lr in base_lrs:
        if lr == 0:
            lambdas.append(_zero)
        elif schedule == "cosine":
            lambdas.append(
                partial(cosine_multiplier, warmup_steps=warmup_steps, total_steps=total_steps,
                        min_lr_ratio=min_lr_ratio)
            )
        elif schedule == "constant":
            lambdas.append(partial(constant_multiplier, warmup_steps=warmup_steps, total_steps=total_steps))
        else:
            if target_lr is None or target_lr <= 0:
                raise ValueError(f"the converging schedule needs a positive target_lr, got {target_lr}")
            lambdas.append(
                partial(converging_multiplier, warmup_steps=warmup_steps, total_steps=total_steps,
                        ratio=target_lr / lr)
            )
    return lambdas


def query_budget(budgets: list[int], step: int) -> int:
    """The number of queries per frame of optimizer step ``step`` under budget training: drawn uniformly from
    the entries of ``budgets`` (a k listed n times is drawn n times as often) by a generator seeded with the
    step, so every rank and every resumed run draws the same."""
    generator = torch.Generator().manual_seed(step)
    return budgets[int(torch.randint(len(budgets), (1,), generator=generator))]
