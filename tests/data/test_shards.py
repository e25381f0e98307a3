"""Shard sets: patterns, the shard index (of local shards from the tars, of streamed ones from their stats)
and damaged shards."""

import pytest
from shardkit import SIZES, ShardServer, text_sample, write_shard, write_stats

from fovlm.data.shard_stats import ShardStatsError
from fovlm.data.shards import ShardReadError, build_index, expand_shards, iter_tar_samples


def test_expand_shards(shards, tmp_path):
    paths, root = shards
    assert expand_shards(str(root / "video-{000..006}.tar")) == paths
    assert expand_shards([str(root / "video-00[0-2].tar"), str(root / "video-00{5,6}.tar")]) == (
        paths[:3] + paths[5:]
    )
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards([str(root / "video-000.tar"), str(root / "nothing-*.tar")])
    with pytest.raises(FileNotFoundError, match="video-007.tar"):
        expand_shards(str(root / "video-{005..009}.tar"))


def test_index_counts_and_frames(shards, tmp_path):
    paths, _ = shards
    index = build_index(paths, tmp_path / "cache")
    assert [index[p].num_samples for p in paths] == SIZES
    assert index[paths[0]].frame_codes.tolist() == [1 + i % 3 for i in range(5)]
    # The cache answers the second time (same result).
    again = build_index(paths, tmp_path / "cache")
    assert all((again[p].frame_codes == index[p].frame_codes).all() for p in paths)
    assert len(list((tmp_path / "cache").glob("*.json"))) == len(paths)


def test_damaged_shards(tmp_path):
    good = write_shard(tmp_path / "good.tar", [text_sample(f"k{i}", "a") for i in range(6)])
    data = good.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    got = []
    with pytest.raises(ShardReadError, match="truncated"):
        for _, key, _ in iter_tar_samples(str(truncated)):
            got.append(key)
    assert 0 < len(got) < 6
    index = build_index([str(truncated), str(garbage)], tmp_path / "cache")
    assert index[str(truncated)].num_samples == len(got) and "truncated" in index[str(truncated)].error
    assert index[str(garbage)].num_samples == 0 and index[str(garbage)].error
    # Reading a range skips earlier samples without loading them.
    loaded = [(i, m is not None) for i, _, m in iter_tar_samples(str(good), 2, 5, load=lambda i: i != 3)]
    assert loaded == [(2, True), (3, False), (4, True)]


def test_streamed_patterns_are_brace_expanded_only():
    assert expand_shards("pipe:aws s3 cp s3://b/{000..002}.tar -") == [
        f"pipe:aws s3 cp s3://b/{i:03d}.tar -" for i in range(3)
    ]
    # Nothing is listed or globbed ('*' and '?' are the command's or the URL's own), nor checked to exist.
    assert expand_shards(["http://h/x-*.tar?a=1", "https://h/{b,a}.tar"]) == [
        "http://h/x-*.tar?a=1",
        "https://h/b.tar",
        "https://h/a.tar",
    ]
    with pytest.raises(FileNotFoundError, match=r"scheme 's3' is not read directly.*pipe:aws s3 cp"):
        expand_shards("s3://bucket/{000..009}.tar")


def test_streamed_shards_are_indexed_from_their_stats(shards, tmp_path):
    paths, root = shards
    write_stats(paths)
    local = build_index(paths, tmp_path / "cache")
    with ShardServer(root) as server:
        urls = expand_shards(server.url("video-{000..006}.tar"))
        streamed = build_index(urls, tmp_path / "cache")
        assert sorted(server.requests) == sorted(f"video-{s:03d}.stats.json" for s in range(len(SIZES)))
    piped = build_index([f"pipe:cat {p}" for p in paths], tmp_path / "cache")
    for p, url in zip(paths, urls, strict=True):
        assert streamed[url].frame_codes.tolist() == piped[f"pipe:cat {p}"].frame_codes.tolist()
        assert streamed[url].frame_codes.tolist() == local[p].frame_codes.tolist()
    assert len(list((tmp_path / "cache").glob("*.json"))) == len(paths)  # streamed indexes are not cached
    with pytest.raises(ShardStatsError, match=r"stats of shard pipe:cat .*nothing\.tar"):
        build_index(["pipe:cat /nowhere/nothing.tar 2>/dev/null"], tmp_path / "cache")
