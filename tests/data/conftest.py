"""Fixtures of the data tests."""

import pytest
from shardkit import video_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Seven caption shards of uneven sizes (``shardkit.SIZES``) and their folder."""
    root = tmp_path_factory.mktemp("shards")
    return video_shards(root), root
