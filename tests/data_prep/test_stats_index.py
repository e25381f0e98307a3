"""``python -m data_prep.stats_index``: the shard index written beside shards made by other tools, other stats
fields kept, damaged shards listed."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from data_prep.stats_index import main
from fovlm.data.shard_stats import read_stats_index


def _shard(path: Path, frames: list[int]) -> Path:
    """A shard written with webdataset alone: caption samples with ``frames[i]`` numbered frames each."""
    with wds.TarWriter(str(path)) as sink:
        for i, n in enumerate(frames):
            record = {"source": "other", "media": "video", "caption": f"clip {i}"}
            sink.write({"__key__": f"s{i}", "json": json.dumps(record).encode(),
                        **{f"{j:03d}.jpg": b"jpeg" for j in range(n)}})
    return path


def test_index_is_written_beside_local_shards(tmp_path, capsys):
    _shard(tmp_path / "a-000.tar", [1, 3])
    _shard(tmp_path / "a-001.tar", [2])
    (tmp_path / "a-001.stats.json").write_text(json.dumps({"name": "a-001.tar", "per_source": {"other": 1}}))
    assert main([str(tmp_path / "a-{000..001}.tar")]) == 0
    first = json.loads((tmp_path / "a-000.stats.json").read_text())
    assert first["index"]["keys"] == ["s0", "s1"] and first["index"]["frame_codes"] == [1, 3]
    second = json.loads((tmp_path / "a-001.stats.json").read_text())
    assert second["per_source"] == {"other": 1} and second["index"]["frame_codes"] == [2]  # other fields kept
    assert read_stats_index(f"pipe:cat {tmp_path / 'a-000.tar'}").tolist() == [1, 3]
    assert "a-000.stats.json: 2 samples" in capsys.readouterr().out


def test_damaged_shards_are_listed_and_fail_the_command(tmp_path, capsys):
    _shard(tmp_path / "b-000.tar", [1])
    cut = _shard(tmp_path / "b-001.tar", [2, 2])
    data = cut.read_bytes()
    cut.write_bytes(data[: data.find(b"s1.") + 100])
    assert main([str(tmp_path / "b-*.tar")]) == 1
    assert (tmp_path / "b-000.stats.json").is_file() and not (tmp_path / "b-001.stats.json").exists()
    err = capsys.readouterr().err
    assert "skipped: shard" in err and "b-001.tar is truncated" in err
