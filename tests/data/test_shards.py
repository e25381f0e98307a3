"""Shards on disk: patterns, the shard index and damaged shards."""

import pytest
from shardkit import SIZES, text_sample, write_shard

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
