"""The epoch plan: samples per group, weighted groups cycling through their passes, and streamed shards split
whole between slots where that keeps the shares even."""

from collections import Counter

import numpy as np
import pytest
from shardkit import text_sample, write_shard

from fovlm.data.plan import EpochPlanner, PlanConfig, ShardGroup, group_counts
from fovlm.data.shards import ShardInfo, build_index


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


def _streamed_planner(sizes, world, workers, counts=None, batch_size=3, tolerance=0.1):
    """A planner over one group of streamed shards (``pipe:`` sources: the plan never opens them)."""
    shards = tuple(f"pipe:cat /shards/{s:03d}.tar" for s in range(len(sizes)))
    index = {p: ShardInfo(p, np.ones(n, dtype=np.int16)) for p, n in zip(shards, sizes, strict=True)}
    config = PlanConfig(batch_size=batch_size, shuffle_buffer=4, shard_split_tolerance=tolerance)
    return EpochPlanner([ShardGroup("remote", shards)], index, counts or [sum(sizes)], config)


def _slot_refs(planner, epoch, world, workers):
    return [planner.worker_plan(epoch, r, world, w, workers).inputs for r in range(world) for w in range(workers)]


@pytest.mark.parametrize("epoch", [0, 1])
def test_streamed_shards_are_split_whole_between_slots(epoch):
    sizes = [5] * 12 + [4, 6, 5, 5]  # 80 samples, 16 shards, 4 slots: whole shards fit within 10 %
    planner = _streamed_planner(sizes, world=2, workers=2)
    per_slot = _slot_refs(planner, epoch, 2, 2)
    readers = {}
    for slot, refs in enumerate(per_slot):
        for ref in refs:
            assert readers.setdefault(ref.shard, slot) == slot  # each shard read by one slot alone
        held = Counter(ref.shard for ref in refs)
        assert all(n == sizes[s] for s, n in held.items())  # and wholly
        assert abs(len(refs) - 20) <= 2
    assert sorted((r.shard, r.index) for refs in per_slot for r in refs) == [
        (s, i) for s, n in enumerate(sizes) for i in range(n)
    ]
    # Every rank still yields the same number of batches.
    assert len({sum(len(p.bounds) - 1 for p in (planner.worker_plan(epoch, r, 2, w, 2) for w in range(2)))
                for r in range(2)}) == 1


def test_uneven_streamed_shards_fall_back_to_sample_granularity():
    sizes = [5, 1, 9, 3, 12, 7, 2]  # whole shards cannot give 4 slots even shares: split by sample
    planner = _streamed_planner(sizes, world=2, workers=2)
    per_slot = _slot_refs(planner, 0, 2, 2)
    assert sorted(len(refs) for refs in per_slot) == [9, 10, 10, 10]
    assert sorted((r.shard, r.index) for refs in per_slot for r in refs) == [
        (s, i) for s, n in enumerate(sizes) for i in range(n)
    ]
    # With a looser tolerance the same shards are split whole.
    loose = _slot_refs(_streamed_planner(sizes, world=2, workers=2, tolerance=1.0), 0, 2, 2)
    slot_of = {(r.shard): slot for slot, refs in enumerate(loose) for r in refs}
    assert len(slot_of) == len(sizes)
    assert all(slot_of[r.shard] == slot for slot, refs in enumerate(loose) for r in refs)


def test_streamed_epochs_across_passes_read_every_sample_once_per_pass():
    sizes = [4] * 10
    planner = _streamed_planner(sizes, world=2, workers=1, counts=[60])  # 1.5 passes per epoch
    reads = Counter(
        (r.shard, r.index) for e in range(2) for refs in _slot_refs(planner, e, 2, 1) for r in refs
    )
    assert set(reads.values()) == {3} and len(reads) == 40  # 3 passes in two epochs
