"""Streamed shard sets end to end (http URLs from a local server, pipe:cat commands): every sample once per
epoch over 2 ranks x 2 workers, exact resume, and damaged shards skipped, counted and named, as for local files."""

import logging
from collections import Counter

import pytest
from shardkit import SIZES, ShardServer, video_shards, write_stats

from fovlm.data.collate import Collator, SampleEncoder
from fovlm.data.contract import FrameSettings
from fovlm.data.datamodules import SFTDataModule
from fovlm.data.plan import EpochPlanner, PlanConfig, ShardGroup
from fovlm.data.shard_stats import ShardStatsError
from fovlm.data.shards import build_index
from fovlm.data.stream import ShardLoader, ShardStream

EVEN = [4] * 8  # 8 shards of 4: 2 ranks x 2 workers read 2 whole shards each
LAYOUTS = {"uneven": SIZES, "even": EVEN}  # SIZES: too uneven for whole shards, split by sample


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both shard sets with their stats, under one folder served over HTTP."""
    root = tmp_path_factory.mktemp("served")
    files = {name: video_shards(root / name, sizes) for name, sizes in LAYOUTS.items()}
    for paths in files.values():
        write_stats(paths)
    with ShardServer(root) as server:
        yield server, files


def _sources(served, kind, layout):
    server, files = served
    if kind == "local":
        return files[layout]
    if kind == "pipe":
        return [f"pipe:cat {p}" for p in files[layout]]
    return [server.url(f"{layout}/video-{s:03d}.tar") for s in range(len(LAYOUTS[layout]))]


def _expected(sizes):
    return sorted(f"v{s}_{i:02d}" for s, n in enumerate(sizes) for i in range(n))


def _loader(sources, index, tokenizer, rank=0, world=1, workers=2, batch_size=3, buffer=6):
    planner = EpochPlanner(
        [ShardGroup("remote", tuple(sources))],
        index,
        [sum(index[p].num_samples for p in sources)],
        PlanConfig(batch_size=batch_size, shuffle_buffer=buffer),
    )
    frames = FrameSettings(frame_size=16, image_frames=8)
    encoder = SampleEncoder(tokenizer, max_length=128, frames=frames)
    stream = ShardStream(planner, encoder, Collator(tokenizer.pad_token_id, frames), rank=rank, world_size=world)
    return ShardLoader(stream, num_workers=workers)


def _shard_requests(server, before):
    return {path: n - before.get(path, 0) for path, n in server.requests.items() if path.endswith(".tar")
            and n > before.get(path, 0)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["uneven", "even"])
@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_every_sample_once_over_ranks_and_workers(served, tokenizer, tmp_path, kind, layout):
    server, _ = served
    sources = _sources(served, kind, layout)
    index = build_index(sources, tmp_path / "cache")
    before = Counter(server.requests)
    keys, batches = [], []
    for rank in range(2):
        loader = _loader(sources, index, tokenizer, rank, world=2, workers=2)
        got = list(loader)
        batches.append(len(got))
        keys += [k for b in got for k in b["key"]]
        assert loader.counts == {}
    assert Counter(keys).most_common(1)[0][1] == 1
    assert sorted(keys) == _expected(LAYOUTS[layout])
    assert len(set(batches)) == 1, batches
    if kind == "http":
        reads = _shard_requests(server, before)
        assert len(reads) == len(sources)
        if layout == "even":
            assert set(reads.values()) == {1}  # split at shard boundaries: each shard downloaded once
        else:
            assert sum(reads.values()) <= len(sources) + 3  # a slot that starts inside a shard reads it too


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "layout"), [("http", "uneven"), ("pipe", "even")])
def test_resume_continues_exactly(served, tokenizer, tmp_path, kind, layout):
    server, _ = served
    sources = _sources(served, kind, layout)
    index = build_index(sources, tmp_path / "cache")
    reference = _loader(sources, index, tokenizer)
    before = Counter(server.requests)
    epoch0 = list(reference)
    full_epoch = sum(_shard_requests(server, before).values())
    epoch1 = list(reference)
    for k in (1, 5, len(epoch0) - 1):
        interrupted = _loader(sources, index, tokenizer)
        it = iter(interrupted)
        seen = [next(it) for _ in range(k)]
        state = interrupted.state_dict()
        del it
        resumed = _loader(sources, index, tokenizer)
        resumed.load_state_dict(state)
        before = Counter(server.requests)
        rest = list(resumed)
        assert [b["key"] for b in seen + rest] == [b["key"] for b in epoch0], k
        for got, want in zip(rest, epoch0[k:], strict=True):
            assert got["input_ids"].equal(want["input_ids"]) and got["frames"].equal(want["frames"])
        if kind == "http" and k == len(epoch0) - 1:
            # Shards whose samples were all yielded before the resume point are not downloaded again.
            assert sum(_shard_requests(server, before).values()) < full_epoch
    finished = _loader(sources, index, tokenizer)
    list(finished)
    resumed = _loader(sources, index, tokenizer)
    resumed.load_state_dict(finished.state_dict())
    assert [b["key"] for b in resumed] == [b["key"] for b in epoch1]


@pytest.fixture
def damaged(tmp_path):
    """The uneven set with its stats, then shard 2 cut inside its fourth sample and shard 6 overwritten with
    bytes that are no tar (their stats still count every sample: the damage happened on the way)."""
    root = tmp_path / "damaged"
    paths = video_shards(root)
    write_stats(paths)
    cut = open(paths[2], "rb").read()
    open(paths[2], "wb").write(cut[: cut.find(b"v2_03.") + 600])
    open(paths[6], "wb").write(b"this is no tar" * 200)
    return root, paths


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_damaged_shards_keep_their_readable_samples(damaged, tokenizer, tmp_path, caplog, kind):
    root, paths = damaged
    local_index = build_index(paths, tmp_path / "cache")
    assert local_index[paths[2]].num_samples == 3 and local_index[paths[6]].num_samples == 0
    local = _loader(paths, local_index, tokenizer)
    local_keys = sorted(k for b in local for k in b["key"])
    assert local_keys == sorted(set(_expected(SIZES)) - {f"v2_{i:02d}" for i in range(3, 9)}
                                - {"v6_00", "v6_01"})
    with ShardServer(root) as server:
        sources = [f"pipe:cat {p}" for p in paths] if kind == "pipe" else [
            server.url(f"video-{s:03d}.tar") for s in range(len(paths))
        ]
        index = build_index(sources, tmp_path / "cache")
        assert [index[s].num_samples for s in sources] == SIZES  # from the stats
        loader = _loader(sources, index, tokenizer)
        with caplog.at_level(logging.WARNING):
            keys = sorted(k for b in loader for k in b["key"])
    # The same readable samples. The plan counted the lost ones too, so a worker may run short of good samples
    # for its planned batches: a sample is then repeated, and counted as padded, as for any failing sample.
    padded = loader.counts.pop("padded", 0)
    assert sorted(set(keys)) == local_keys and len(keys) == len(local_keys) + padded
    assert loader.counts == {"shard_error": 6 + 2}  # the samples the stats promised and the shards lost
    warned = [r.getMessage() for r in caplog.records if "(shard_error)" in r.getMessage()]
    assert len(warned) == 1
    assert any(name in warned[0] for name in (sources[2], sources[6]))
    assert "truncated" in warned[0] or "not a readable tar" in warned[0]


@pytest.mark.slow
def test_a_datamodule_reads_shards_over_http(served, smollm2_dir, tmp_path):
    server, _ = served

    def module(train_shards):
        return SFTDataModule(train_shards=train_shards, tokenizer=str(smollm2_dir), frame_size=16, batch_size=4,
                             num_workers=2, text_ratio=0.0, index_cache=str(tmp_path / "index"), max_length=128)

    dm = module(server.url("uneven/video-{000..006}.tar"))
    dm.setup("fit")
    assert sorted(k for b in dm.train_dataloader() for k in b["key"]) == _expected(SIZES)
    missing = module([server.url("uneven/video-000.tar"), server.url("elsewhere/video-000.tar")])
    with pytest.raises(ShardStatsError, match=r"stats of shard http://.*/elsewhere/video-000\.tar"):
        missing.setup("fit")
