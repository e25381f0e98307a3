"""The stream and its loader: exact-once coverage over ranks x workers, equal batch counts, resume, text
retention, frame budgets, failing samples and process groups."""

from collections import Counter

import pytest
import torch
from shardkit import SIZES, caption_sample, text_sample, write_shard

from fovlm.data.collate import Collator, SampleEncoder
from fovlm.data.contract import FrameSettings
from fovlm.data.plan import EpochPlanner, PlanConfig, ShardGroup, group_counts
from fovlm.data.shards import build_index
from fovlm.data.stream import ShardLoader, ShardStream


def _stream(
    paths,
    index,
    tokenizer,
    rank=0,
    world=1,
    *,
    batch_size=4,
    budget=None,
    shuffle=True,
    buffer=8,
    text=None,
    text_ratio=0.0,
    seed=0,
):
    groups = [ShardGroup("video", tuple(paths))]
    totals = [sum(index[p].num_samples for p in paths)]
    flags = [False]
    if text:
        groups.append(ShardGroup("text", tuple(text)))
        totals.append(sum(index[p].num_samples for p in text))
        flags.append(True)
    counts = group_counts(totals, [None] * len(groups), flags, text_ratio)
    planner = EpochPlanner(
        groups,
        index,
        counts,
        PlanConfig(
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=buffer,
            max_frames_per_batch=budget,
        ),
    )
    frames = FrameSettings(frame_size=16, image_frames=8)
    encoder = SampleEncoder(tokenizer, max_length=128, frames=frames)
    return ShardStream(
        planner, encoder, Collator(tokenizer.pad_token_id, frames), rank=rank, world_size=world
    )


@pytest.mark.slow
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (1, 3), (2, 2), (3, 2)])
@pytest.mark.parametrize("budget", [None, 5])
def test_every_sample_once_and_equal_batch_counts(shards, tokenizer, tmp_path, world, workers, budget):
    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")
    keys, batches_per_rank = [], []
    for rank in range(world):
        loader = ShardLoader(
            _stream(paths, index, tokenizer, rank, world, budget=budget), num_workers=workers
        )
        batches = list(loader)
        batches_per_rank.append(len(batches))
        keys += [k for b in batches for k in b["key"]]
        if budget is not None:
            assert all(b["num_frames"].sum() <= budget or len(b["key"]) == 1 for b in batches)
        else:
            assert len(loader) == len(batches)
        assert loader.counts.get("padded", 0) == 0
    assert Counter(keys).most_common(1)[0][1] == 1  # no duplicate
    assert sorted(keys) == sorted(f"v{s}_{i:02d}" for s, n in enumerate(SIZES) for i in range(n))
    assert len(set(batches_per_rank)) == 1, batches_per_rank


def test_epochs_reshuffle_and_seed_matters(shards, tokenizer, tmp_path):
    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")
    loader = ShardLoader(_stream(paths, index, tokenizer), num_workers=0)
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    other_seed = [k for b in ShardLoader(_stream(paths, index, tokenizer, seed=1)) for k in b["key"]]
    assert sorted(first) == sorted(second) == sorted(other_seed)
    assert first != second and first != other_seed
    unshuffled = [k for b in ShardLoader(_stream(paths, index, tokenizer, shuffle=False)) for k in b["key"]]
    assert unshuffled == [f"v{s}_{i:02d}" for s, n in enumerate(SIZES) for i in range(n)]


@pytest.mark.slow
def test_resume_continues_exactly(shards, tokenizer, tmp_path):
    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")

    def loader():
        return ShardLoader(_stream(paths, index, tokenizer, batch_size=3, buffer=6), num_workers=2)

    reference = loader()
    epoch0 = [b for b in reference]
    epoch1 = [b for b in reference]
    for k in (1, 5):
        interrupted = loader()
        it = iter(interrupted)
        seen = [next(it) for _ in range(k)]
        state = interrupted.state_dict()
        del it
        resumed = loader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert [b["key"] for b in seen + rest] == [b["key"] for b in epoch0]
        for got, want in zip(rest, epoch0[k:], strict=True):
            assert got["input_ids"].equal(want["input_ids"]) and got["frames"].equal(want["frames"])
    # A state saved at the end of an epoch resumes with the next epoch.
    finished = loader()
    list(finished)
    resumed = loader()
    resumed.load_state_dict(finished.state_dict())
    assert [b["key"] for b in resumed] == [b["key"] for b in epoch1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_under_a_frame_budget_is_exact_behind_lightnings_read_ahead(shards, tokenizer, tmp_path, workers):
    """An unsized loader (frame budget) is read one batch ahead by Lightning's fetcher: the saved position is that of
    the batches handed to training, so the resumed run continues with the batch read ahead."""
    from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher

    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")

    def loader():
        return ShardLoader(_stream(paths, index, tokenizer, batch_size=3, buffer=6, budget=5), num_workers=workers)

    reference = loader()
    assert reference.read_ahead
    epoch0, epoch1 = [b["key"] for b in reference], [b["key"] for b in reference]
    for k in (1, 4, len(epoch0)):
        interrupted = loader()
        fetcher = _PrefetchDataFetcher()
        fetcher.setup(interrupted)
        it = iter(fetcher)
        trained = [next(it)["key"] for _ in range(k)]
        state = interrupted.state_dict()
        del it, fetcher
        resumed = loader()
        resumed.load_state_dict(state)
        rest = [b["key"] for b in resumed]
        # At the epoch's end nothing was read ahead, and the resumed loader starts the next epoch.
        assert trained + rest == (epoch0 if k < len(epoch0) else epoch0 + epoch1), k


def test_text_retention_share(tmp_path, tokenizer):
    video = [
        str(
            write_shard(
                tmp_path / f"v{s}.tar",
                [caption_sample(f"v{s}_{i:03d}", "c", frames=1, size=(8, 8)) for i in range(430)],
            )
        )
        for s in range(4)
    ]
    text = [
        str(write_shard(tmp_path / f"t{s}.tar", [text_sample(f"t{s}_{i:03d}", "a") for i in range(150)]))
        for s in range(2)
    ]
    index = build_index(video + text, tmp_path / "cache")
    stream = _stream(video, index, tokenizer, batch_size=8, text=text, text_ratio=0.14, buffer=50)
    batches = list(ShardLoader(stream, num_workers=0))
    keys = [k for b in batches for k in b["key"]]
    is_text = [k.startswith("t") for k in keys]
    assert len(keys) == 2000
    assert abs(sum(is_text) / len(keys) - 0.14) <= 0.03
    for b in batches:
        for key, n in zip(b["key"], b["num_frames"].tolist(), strict=True):
            assert (n == 0) == key.startswith("t")  # text samples carry no visual token
    # Spread through the epoch, not bunched: every quarter of the stream holds text.
    quarter = len(is_text) // 4
    assert all(0.07 < sum(is_text[q * quarter : (q + 1) * quarter]) / quarter < 0.21 for q in range(4))


@pytest.mark.slow
def test_resume_with_failing_samples(tmp_path, tokenizer):
    from shardkit import image_bytes

    samples = []
    bad = {
        0,
        1,
        11,
        12,
        13,
    }  # planned batches [0 1] and [12 13] fail entirely: neighbours are split to cover them
    for i in range(16):
        sample = caption_sample(f"s{i:02d}", f"clip {i}", frames=1, size=(8, 8))
        if i in bad:
            sample["000.jpg"] = image_bytes()[:50]
        samples.append(sample)
    paths = [str(write_shard(tmp_path / "mixed.tar", samples))]
    index = build_index(paths, tmp_path / "cache")

    def loader():
        return ShardLoader(_stream(paths, index, tokenizer, batch_size=2, shuffle=False), num_workers=2)

    reference = loader()
    full = [b["key"] for b in reference]
    kept = sorted(k for b in full for k in b)
    assert kept == sorted(f"s{i:02d}" for i in range(16) if i not in bad)  # nothing repeated
    assert len(full) == len(reference) == 8  # the planned batch count, though whole batches failed
    assert reference.counts == {"bad_image": 5}
    for k in range(1, len(full)):
        interrupted = loader()
        it = iter(interrupted)
        seen = [next(it)["key"] for _ in range(k)]
        state = interrupted.state_dict()
        del it
        resumed = loader()
        resumed.load_state_dict(state)
        assert seen + [b["key"] for b in resumed] == full, k


def _key_only(key, members):
    """A light encoder for process-group tests (no tokenizer to load in every process)."""
    return {"key": key, "frames": None}


def _keys_batch(samples):
    return {"key": [s["key"] for s in samples]}


def _ddp_rank(rank, world, paths, index, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    planner = EpochPlanner(
        [ShardGroup("video", tuple(paths))],
        index,
        [sum(SIZES)],
        PlanConfig(batch_size=3, shuffle_buffer=5, max_frames_per_batch=4),
    )
    loader = ShardLoader(
        ShardStream(planner, _key_only, _keys_batch, rank=dist.get_rank(), world_size=dist.get_world_size()),
        num_workers=2,
    )
    keys, steps = [], 0
    for batch in loader:
        # A collective per batch, like DDP's gradient all-reduce: unequal batch counts would hang here.
        step = torch.ones(1)
        dist.all_reduce(step)
        assert step.item() == world
        keys += batch["key"]
        steps += 1
    gathered = [None] * world
    dist.all_gather_object(gathered, (steps, keys))
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_process_group_ranks_stay_in_step(shards, tmp_path):
    import torch.multiprocessing as mp

    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")
    out = tmp_path / "gathered.pt"
    # Forked ranks start in a fraction of a second (spawned ones re-import everything).
    mp.start_processes(
        _ddp_rank, args=(2, paths, index, tmp_path / "pg-init", out), nprocs=2, join=True, start_method="fork"
    )
    gathered = torch.load(out)
    assert len({steps for steps, _ in gathered}) == 1  # every rank ran the same number of steps
    keys = [k for _, ks in gathered for k in ks]
    assert sorted(keys) == sorted(f"v{s}_{i:02d}" for s, n in enumerate(SIZES) for i in range(n))


def _explode(key, members):
    if key.endswith("_01"):
        raise KeyError("an unforeseen failure")
    return {"key": key, "frames": None}


def test_unexpected_encoder_error_is_one_skipped_sample(shards, tmp_path):
    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")
    planner = EpochPlanner([ShardGroup("v", tuple(paths))], index, [sum(SIZES)], PlanConfig(batch_size=4))
    loader = ShardLoader(ShardStream(planner, _explode, _keys_batch))
    keys = [k for b in loader for k in b["key"]]
    failing = [f"v{s}_01" for s, n in enumerate(SIZES) if n > 1]
    assert len(keys) == sum(SIZES) - len(failing) and not set(failing) & set(keys)
    assert loader.counts == {"unexpected_error": len(failing)}
