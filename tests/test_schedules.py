"""Tests for fovlm.schedules against the values of docs/recipe.md#learning-rate-schedules."""

import math

import pytest
import torch

from fovlm.schedules import lr_lambdas


def run_lambdalr(schedule, base_lrs, total_steps, **kwargs):
    """LR of every group at every optimizer step, as LambdaLR sets it (steps 0..total_steps-1)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(schedule, base_lrs, total_steps, **kwargs))
    history = []
    for _ in range(total_steps):
        history.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


def test_converging_stage1_135m_matches_reference_values():
    # stage1_135M: N = 31,250, W = int(0.03 N) = 937; connector 1e-3 -> 3e-5; dino and llm 1e-5 -> 3e-5
    n, w = 31_250, 937
    lams = lr_lambdas("converging", [1e-3, 1e-5, 1e-5], n, warmup_ratio=0.03, target_lr=3e-5)
    lr = lambda step: [base * lam(step) for base, lam in zip([1e-3, 1e-5, 1e-5], lams)]  # noqa: E731
    end_of_warmup, middle, last = lr(w - 1), lr((w + n) // 2 - 1), lr(n - 1)
    assert end_of_warmup == pytest.approx([1e-3, 1e-5, 1e-5], rel=1e-12)
    assert middle == pytest.approx([(1e-3 + 3e-5) / 2, 2e-5, 2e-5], rel=1e-4)
    assert last == pytest.approx([3e-5, 3e-5, 3e-5], rel=1e-12)
    # warmup is linear from the first step on (no step at LR 0), and the backbones rise monotonically
    assert lr(0) == pytest.approx([1e-3 / w, 1e-5 / w, 1e-5 / w])
    backbone = [lr(s)[1] for s in range(w - 1, n, 997)]
    assert all(a <= b for a, b in zip(backbone, backbone[1:]))


def test_converging_through_lambdalr_per_group():
    history = run_lambdalr("converging", [1e-3, 1e-5, 0.0], 100, warmup_ratio=0.1, target_lr=3e-5)
    assert history[0] == pytest.approx([1e-4, 1e-6, 0.0])
    assert history[9] == pytest.approx([1e-3, 1e-5, 0.0])  # end of warmup (W = 10)
    assert history[-1] == pytest.approx([3e-5, 3e-5, 0.0])  # every group ends at target; LR 0 stays 0
    mid = history[9 + 45]  # p = 1/2
    assert mid == pytest.approx([(1e-3 + 3e-5) / 2, 2e-5, 0.0])


@pytest.mark.parametrize("n, ratio, base", [(31_250, 0.03, 3e-5), (2_593, 0.1, 1e-6)])
def test_cosine_ends_at_its_floor(n, ratio, base):
    (lam,) = lr_lambdas("cosine", [base], n, warmup_ratio=ratio)
    w = int(n * ratio)
    assert base * lam(w - 1) == pytest.approx(base)
    assert base * lam(n - 1) == pytest.approx(0.1 * base)  # stage 2: 3e-5 -> 3e-6, stage 3: 1e-6 -> 1e-7
    assert lam(n + 100) == pytest.approx(0.1)
    values = [lam(s) for s in range(w - 1, n)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_floor_is_configurable():
    (lam,) = lr_lambdas("cosine", [1.0], 50, warmup_ratio=0.0, min_lr_ratio=0.25)
    assert lam(49) == pytest.approx(0.25)
    assert lam(0) == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 50)))


def test_constant_after_warmup():
    history = run_lambdalr("constant", [2e-4, 5e-5], 40, warmup_ratio=0.25)
    assert history[0] == pytest.approx([2e-4 / 10, 5e-5 / 10])
    assert all(h == pytest.approx([2e-4, 5e-5]) for h in history[9:])


def test_schedule_errors_are_clear():
    with pytest.raises(ValueError, match="target_lr"):
        lr_lambdas("converging", [1e-3], 10)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_lambdas("linear", [1e-3], 10)
    with pytest.raises(ValueError, match="finite"):
        lr_lambdas("cosine", [1e-3], math.inf)
