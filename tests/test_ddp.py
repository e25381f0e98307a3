"""Two CPU processes (DDP over gloo) through the real `fovlm fit`: the ranks read disjoint samples and end with
the same weights."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict

import pytest
from fitkit import fit_args, fovlm_command, subprocess_env, synthetic_data


@pytest.mark.slow
def test_two_ranks_read_disjoint_data_and_agree_on_weights(tmp_path_factory, tmp_path):
    data = synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")
    record = tmp_path / "record"
    args = fit_args(1, data, tmp_path / "runs", steps=5, record=record, extra=[
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.limit_val_batches", "0",
    ])
    result = subprocess.run(fovlm_command(args), env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 5 for r in ranks)
    by_epoch = [defaultdict(set) for _ in ranks]
    for rank, info in enumerate(ranks):
        for item in info["keys"]:
            epoch, key = item.split("/", 1)
            by_epoch[rank][epoch].add(key)
        assert len(info["keys"]) >= 5 * 4 - 2  # five batches of about four samples each
    for epoch in set(by_epoch[0]) & set(by_epoch[1]):
        assert not by_epoch[0][epoch] & by_epoch[1][epoch], f"epoch {epoch}: a sample was read by both ranks"
    assert ranks[0]["weights"] == ranks[1]["weights"]
