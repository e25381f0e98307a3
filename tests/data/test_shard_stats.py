"""The stats beside a shard: where a streamed shard's stats are, and its index read from them (never from the
shard), or an error that names the shard and where its stats were looked for."""

import json

import numpy as np
import pytest
from shardkit import ShardServer, caption_sample, text_sample, write_shard, write_stats

from fovlm.data.shard_stats import ShardStatsError, index_entry, read_stats_index, stats_source
from fovlm.data.shards import scan_shard


def test_stats_source_rule():
    assert stats_source("https://host/set/000042.tar") == "https://host/set/000042.stats.json"
    assert stats_source("pipe:aws s3 cp s3://b/set/000042.tar -") == "pipe:aws s3 cp s3://b/set/000042.stats.json -"
    assert stats_source("pipe:cat /d/x.tar.d/000001.tar") == "pipe:cat /d/x.tar.d/000001.stats.json"  # the last one
    assert stats_source("http://h/a.tar?version=3") == "http://h/a.stats.json?version=3"
    assert stats_source("data/000000.tar") == "data/000000.stats.json"
    for nameless in ("pipe:get-shard 7", "http://h/shard.tgz", "http://h/x.tarball"):
        with pytest.raises(ShardStatsError, match="must name its '.tar' file"):
            stats_source(nameless)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A shard of videos, an image and a text sample with its stats; one shard without stats, one whose stats
    predate the index and one with an inconsistent index."""
    root = tmp_path_factory.mktemp("indexed")
    image = caption_sample("img", "An image.", frames=0, media="image")
    image["jpg"] = caption_sample("x", "x", frames=1)["000.jpg"]
    samples = [caption_sample("v0", "Two.", frames=2), image, text_sample("t0", "Yes."), caption_sample("v1", "One.", frames=1)]
    write_stats([str(write_shard(root / "000000.tar", samples))])
    write_shard(root / "000001.tar", samples)  # no stats
    write_shard(root / "000002.tar", samples)
    (root / "000002.stats.json").write_text(json.dumps({"name": "000002.tar", "samples": 4}))
    write_shard(root / "000003.tar", samples)
    broken = index_entry(["a", "b"], [1, 2], 10)
    broken["samples"] = 3
    (root / "000003.stats.json").write_text(json.dumps({"index": broken}))
    return root


def test_the_index_comes_from_the_stats(indexed):
    local = scan_shard(str(indexed / "000000.tar"))
    assert local.error is None and local.frame_codes.tolist() == [2, -2, 0, 1]
    stats = json.loads((indexed / "000000.stats.json").read_text())
    assert stats["index"]["keys"] == ["v0", "img", "t0", "v1"]
    assert stats["index"]["bytes"] == (indexed / "000000.tar").stat().st_size
    with ShardServer(indexed) as server:
        for source in (server.url("000000.tar"), f"pipe:cat {indexed / '000000.tar'}"):
            codes = read_stats_index(source)
            assert codes.dtype == np.int16 and codes.tolist() == local.frame_codes.tolist()
        assert server.requests == {"000000.stats.json": 1}  # the shard itself was never read


def test_missing_or_unusable_stats_name_the_shard(indexed):
    with ShardServer(indexed) as server:
        url = server.url("000001.tar")
        with pytest.raises(ShardStatsError, match=rf"stats of shard {url} \(.*000001\.stats\.json\).*status 22"):
            read_stats_index(url)
        with pytest.raises(ShardStatsError, match=r"000002\.stats\.json\) hold no shard index.*data_prep\.stats_index"):
            read_stats_index(server.url("000002.tar"))
        with pytest.raises(ShardStatsError, match="inconsistent index"):
            read_stats_index(server.url("000003.tar"))
    with pytest.raises(ShardStatsError, match=r"cannot read the stats of shard pipe:cat .*000001\.tar"):
        read_stats_index(f"pipe:cat {indexed / '000001.tar'} 2>/dev/null")
    with pytest.raises(ValueError, match="2 keys for 1 frame codes"):
        index_entry(["a", "b"], [1], 0)
