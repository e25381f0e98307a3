"""Shard writing: bad input is skipped and listed, re-runs skip finished shards, N processes give the same
shards as one, a dying worker costs one item, keys have no dots."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from prepkit import read_shards, write_clip

import data_prep.media
from data_prep.cli import convert
from data_prep.media import MediaOptions
from data_prep.writer import Built, Skip, write_shards


def openvid_set(root: Path, n_good: int = 5, bad: bool = True) -> Path:
    """An OpenVid-layout CSV with ``n_good`` clips (2-4 s), plus, when ``bad``, a zero-byte video, a missing
    file, a malformed row (no caption) and a file that is not a video."""
    videos = root / "video"
    rows = []
    for i in range(n_good):
        write_clip(videos / f"clip{i}.mp4", 2 + i % 3, fps=2)
        rows.append({"video": f"clip{i}.mp4", "caption": f"caption number {i}"})
    if bad:
        (videos / "empty.mp4").write_bytes(b"")
        (videos / "garbage.mp4").write_bytes(b"this is not an mp4 file" * 20)
        rows += [{"video": "empty.mp4", "caption": "an empty file"},
                 {"video": "missing.mp4", "caption": "a file that is not there"},
                 {"video": "clip0.mp4", "caption": ""},
                 {"video": "garbage.mp4", "caption": "not a video"}]
    path = root / "OpenVid-1M.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption", "seconds"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def test_bad_items_are_skipped_counted_and_listed(tmp_path, manifest_of):
    csv_path = openvid_set(tmp_path / "in")
    manifest = convert("openvid", csv_path, tmp_path / "out", workers=0, samples_per_shard=4, progress=False)
    assert manifest["samples"] == 5 and manifest["samples_per_source"] == {"openvid": 5}
    assert manifest["source"] == "openvid" and manifest["input"] == str(csv_path)
    assert manifest["skipped"] == {"bad_row": 1, "empty_file": 1, "missing_file": 1, "unreadable_video": 1}
    listed = {(s["item"], s["reason"]) for s in manifest["skipped_items"]}
    assert listed == {("empty.mp4", "empty_file"), ("missing.mp4", "missing_file"),
                      ("OpenVid-1M.csv:9", "bad_row"), ("garbage.mp4", "unreadable_video")}
    assert manifest_of(tmp_path / "out") == manifest
    # 9 items in shards of 4 -> 3 shards; frame counts of the good clips (2, 3, 4, 2, 3 s) at 1 FPS.
    assert [s["name"] for s in manifest["shards"]] == ["000000.tar", "000001.tar", "000002.tar"]
    assert manifest["frame_histogram"] == {"2": 2, "3": 2, "4": 1}
    samples = read_shards(tmp_path / "out")
    assert sorted(s["sample"].caption for s in samples) == [f"caption number {i}" for i in range(5)]
    assert all("." not in s["key"] for s in samples)
    assert not list((tmp_path / "out").glob("*.partial"))


def test_rerun_skips_finished_shards_without_decoding(tmp_path, monkeypatch):
    csv_path = openvid_set(tmp_path / "in", n_good=6, bad=False)
    out = tmp_path / "out"
    first = convert("openvid", csv_path, out, workers=0, samples_per_shard=2, progress=False)
    assert first["run"]["shards_written"] == 3
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}

    calls = []
    original = data_prep.media.decode_video
    monkeypatch.setattr(data_prep.media, "decode_video", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = convert("openvid", csv_path, out, workers=0, samples_per_shard=2, progress=False)
    assert calls == [] and second["run"]["shards_written"] == 0
    assert second["run"]["shards_reused"] == sorted(stamps)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")} == stamps
    assert second["samples"] == first["samples"] == 6

    # A lost shard is rebuilt alone, byte for byte; other options re-encode everything.
    (out / "000001.tar").unlink()
    third = convert("openvid", csv_path, out, workers=0, samples_per_shard=2, progress=False)
    assert third["run"]["shards_written"] == 1 and len(calls) == 2
    assert (out / "000001.tar").read_bytes() == stamps["000001.tar"][1]
    fourth = convert("openvid", csv_path, out, options=MediaOptions(size=112), workers=0, samples_per_shard=2,
                     progress=False)
    assert fourth["run"]["shards_written"] == 3
    assert read_shards(out)[0]["frames"].shape[-1] == 224  # the loader resizes; stored frames are 112 px
    # A shorter input leaves no stale shard behind.
    fifth = convert("openvid", csv_path, out, workers=0, samples_per_shard=2, limit=2, progress=False)
    assert fifth["run"]["shards_removed"] == ["000001.stats.json", "000001.tar", "000002.stats.json", "000002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"] and len(read_shards(out)) == 2


@pytest.mark.slow
def test_two_processes_write_the_same_shards_as_one(tmp_path):
    csv_path = openvid_set(tmp_path / "in", n_good=6)
    one = convert("openvid", csv_path, tmp_path / "one", workers=0, samples_per_shard=4, progress=False)
    two = convert("openvid", csv_path, tmp_path / "two", workers=2, samples_per_shard=4, progress=False)
    assert one["skipped_items"] == two["skipped_items"] and one["samples"] == two["samples"] == 6
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _build_or_die(key: str, record) -> Built:
    if record.item == "die":
        os._exit(3)  # a crash inside a native decoder looks like this to the pool
    if record.item == "raise":
        raise RuntimeError("a bug in one item")
    return Built(record.item, members={"json": b'{"source": "t", "media": "text", "caption": "x"}'}, source="t")


class _Item:
    def __init__(self, item: str):
        self.item = item

    def __repr__(self) -> str:
        return f"_Item({self.item!r})"


@pytest.mark.slow
def test_a_dying_worker_or_an_exception_costs_one_item(tmp_path):
    items = [_Item("a"), _Item("die"), _Item("b"), _Item("raise"), Skip("row 7", "bad_row", "not JSON"), _Item("c")]
    manifest = write_shards(items, tmp_path, _build_or_die, "opts", workers=2, item_timeout=3.0, progress=False)
    assert manifest["samples"] == 3
    assert manifest["skipped"] == {"bad_row": 1, "error": 1, "timeout": 1}
    assert [s["item"] for s in manifest["skipped_items"]] == ["die", "raise", "row 7"]


def test_command_line_converts_and_reports(tmp_path, capsys):
    import json

    from data_prep.cli import main

    csv_path = openvid_set(tmp_path / "in", n_good=2)
    (tmp_path / "in" / "video" / "frames_dir.mp4").mkdir()  # a folder where a video file should be
    with csv_path.open("a", newline="") as f:
        f.write("frames_dir.mp4,a folder,\n")
    code = main(["openvid", "--input", str(csv_path), "--output", str(tmp_path / "out"), "--workers", "0",
                 "--size", "64", "--jpeg-quality", "70", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 2 and printed["samples_per_source"] == {"openvid": 2}
    assert printed["skipped"] == {"bad_row": 1, "empty_file": 1, "missing_file": 1, "unreadable_video": 1,
                                  "unsupported_media": 1}
    assert all(s["frames"].shape[-1] == 224 for s in read_shards(tmp_path / "out"))


def test_stats_carry_the_shard_index(tmp_path):
    import json

    from fovlm.data.shards import scan_samples

    csv_path = openvid_set(tmp_path / "in", n_good=5)
    out = tmp_path / "out"
    convert("openvid", csv_path, out, workers=0, samples_per_shard=4, progress=False)
    for tar in sorted(out.glob("*.tar")):
        stats_path = out / tar.name.replace(".tar", ".stats.json")
        index = json.loads(stats_path.read_text())["index"]
        keys, codes, error = scan_samples(str(tar))
        assert error is None and index["samples"] == len(keys) == json.loads(stats_path.read_text())["samples"]
        assert (index["keys"], index["frame_codes"]) == (keys, codes)  # what the loader finds in the tar
        assert index["bytes"] == tar.stat().st_size
    assert [c for s in sorted(out.glob("*.stats.json")) for c in json.loads(s.read_text())["index"]["frame_codes"]] \
        == [2, 3, 4, 2, 3]
    # Stats written before they carried the index get it on the next run, without re-encoding the shard.
    first = out / "000000.stats.json"
    old = json.loads(first.read_text())
    old.pop("index")
    first.write_text(json.dumps(old))
    stamp = (out / "000000.tar").stat().st_mtime_ns
    again = convert("openvid", csv_path, out, workers=0, samples_per_shard=4, progress=False)
    assert again["run"]["shards_written"] == 0
    assert json.loads(first.read_text())["index"]["keys"] == [f"000000_{i:04d}" for i in range(4)]
    assert (out / "000000.tar").stat().st_mtime_ns == stamp
