"""Each source module turns a small fixture in its dataset's layout into shards that read back (with the
loader's schema and frame decoding) with the right counts, texts and frame counts."""

from __future__ import annotations

import json

import pytest
from prepkit import read_shards
from sourcekit import FIXTURES, sample_text

from data_prep.cli import convert
from data_prep.sources import SOURCES


def test_every_source_has_a_fixture():
    assert sorted(FIXTURES) == sorted(SOURCES)


@pytest.mark.parametrize("source", SOURCES)
def test_source_fixture_to_shards(source, tmp_path):
    input_path, media, expected, skipped = FIXTURES[source](tmp_path / "raw")
    manifest = convert(source, input_path, tmp_path / "shards", media, workers=0, progress=False)
    assert manifest["skipped"] == skipped, manifest["skipped_items"]
    samples = read_shards(tmp_path / "shards")
    got = {sample_text(s["sample"]): (0 if s["frames"] is None else s["frames"].shape[0]) for s in samples}
    assert got == expected
    assert len(samples) == manifest["samples"] == len(expected)
    for s in samples:
        assert s["sample"].source.split("/")[0] == source
        assert (s["frames"] is None) == (s["sample"].media == "text")
        if s["frames"] is not None:
            assert tuple(s["frames"].shape[1:]) == (3, 224, 224)


def test_broken_annotation_files_and_rows_are_skipped(tmp_path):
    from prepkit import write_clip

    from data_prep.records import read_rows

    root = tmp_path / "vista"
    write_clip(root / "v.mp4", 2)
    (root / "good.json").write_text(json.dumps([{"id": "a", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A clip."}]}]))
    (root / "broken.json").write_text('[{"id": "b", "video": ')
    manifest = convert("vista", root, tmp_path / "out", workers=0, progress=False)
    assert manifest["samples"] == 1 and manifest["skipped"] == {"bad_file": 1}

    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n[1, 2]\n{"a": 2}\n')
    rows = list(read_rows(lines))
    assert [r["a"] for r in rows if isinstance(r, dict)] == [1, 2]
    assert [(r.item, r.reason) for r in rows if not isinstance(r, dict)] == [("rows.jsonl:2", "bad_row"),
                                                                               ("rows.jsonl:3", "bad_row")]
    table = tmp_path / "rows.csv"
    table.write_bytes(b"video,caption\na.mp4,fine\nb.mp4,caf\xe9\nc.mp4,also fine\n")
    rows = list(read_rows(table))
    assert [r["video"] for r in rows if isinstance(r, dict)] == ["a.mp4", "c.mp4"]
    assert [(r.item, r.reason) for r in rows if not isinstance(r, dict)] == [("rows.csv:3", "bad_row")]


def test_parquet_layout_reads_raw_image_bytes(tmp_path):
    """The Cauldron as published: parquet with raw image bytes (not the base64 of a JSON export)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prepkit import image_bytes

    subset = tmp_path / "the_cauldron" / "ai2d"
    subset.mkdir(parents=True)
    table = pa.table({
        "images": [[{"bytes": image_bytes((60, 40), (220, 0, 0)), "path": None}], []],
        "texts": [[{"user": "What colour?", "assistant": "Red.", "source": "ai2d"}],
                  [{"user": "No image?", "assistant": "None.", "source": "ai2d"}]],
    })
    pq.write_table(table, subset / "train-00000-of-00001.parquet")
    manifest = convert("cauldron", tmp_path / "the_cauldron", tmp_path / "shards", workers=0, progress=False)
    samples = read_shards(tmp_path / "shards")
    assert manifest["samples"] == 1 and manifest["skipped"] == {"bad_row": 1}, manifest["skipped_items"]
    assert [sample_text(s["sample"]) for s in samples] == ["What colour?|Red."]
    assert samples[0]["frames"].shape[0] == 1
