"""The epoch plan: samples per group and weighted groups cycling through their passes."""

from collections import Counter

import pytest
from shardkit import text_sample, write_shard

from fovlm.data.plan import EpochPlanner, PlanConfig, ShardGroup, group_counts
from fovlm.data.shards import build_index


def test_group_counts():
    assert group_counts([100, 50], [None, None], [False, False], 0.0) == [100, 50]
    assert group_counts([100, 50, 40], [None, None, None], [False, False, True], 0.25) == [100, 50, 50]
    assert group_counts([100, 50, 10], [55, 30, 15], [False] * 3, 0.0) == [88, 48, 24]
    with pytest.raises(ValueError, match="every shard group"):
        group_counts([1, 2], [1.0, None], [False, False], 0.0)


def test_weighted_groups_cycle_through_passes(tmp_path):
    a = [
        str(write_shard(tmp_path / f"a{s}.tar", [text_sample(f"a{s}_{i}", "x") for i in range(5)]))
        for s in range(2)
    ]
    b = [
        str(write_shard(tmp_path / f"b{s}.tar", [text_sample(f"b{s}_{i}", "x") for i in range(5)]))
        for s in range(2)
    ]
    index = build_index(a + b, tmp_path / "cache")
    counts = group_counts([10, 10], [3.0, 1.0], [False, False], 0.0)
    assert counts == [15, 5]
    planner = EpochPlanner(
        [ShardGroup("a", tuple(a)), ShardGroup("b", tuple(b))],
        index,
        counts,
        PlanConfig(batch_size=4, shuffle_buffer=4),
    )
    epochs = [
        [(r.group, r.shard, r.index) for w in range(2) for r in planner.slot_plan(e, w, 2).inputs]
        for e in range(2)
    ]
    for refs in epochs:
        assert sum(g == 0 for g, _, _ in refs) == 15 and sum(g == 1 for g, _, _ in refs) == 5
    # Group b (5 per epoch) reads each of its 10 samples once over two epochs; group a (15 per epoch) reads
    # its 10 samples in passes: 30 reads over two epochs, each sample exactly 3 times.
    both = Counter(epochs[0] + epochs[1])
    assert {k: v for k, v in both.items() if k[0] == 1} == {(1, s, i): 1 for s in range(2) for i in range(5)}
    assert {v for k, v in both.items() if k[0] == 0} == {3}
