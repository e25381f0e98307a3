"""Each source module turns a small fixture in its dataset's layout into shards that read back (with the
loader's schema and frame decoding) with the right counts, texts and frame counts."""

from __future__ import annotations

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
