"""A shard's stats file and the index it carries: what the planner knows of a streamed shard without reading it.

``data_prep`` writes ``NNNNNN.stats.json`` beside every ``NNNNNN.tar`` (``python -m data_prep.stats_index``
writes one for tars made by other tools). Besides its counts it holds the shard's index::

    "index": {"version": 1, "samples": 3, "bytes": 40960,
              "keys": ["000000_0000", "000000_0001", "000000_0002"],
              "frame_codes": [12, -2, 0]}

one key and one frame code per sample in file order; a code is the sample's frame count (``n >= 0``), ``-1``
for a video file without a ``duration`` in its JSON or ``-2`` for a single image (see
:func:`fovlm.data.shards.planned_frames`). A local shard is indexed by scanning its tar; a streamed one
(``pipe:`` command or URL) from its stats alone, so a remote shard set is never downloaded to be planned.

Where the stats of a streamed shard are: the same source with its last ``.tar`` replaced by ``.stats.json``
(:func:`stats_source`): ``https://host/set/000042.tar`` has ``https://host/set/000042.stats.json``, and
``pipe:aws s3 cp s3://bucket/set/000042.tar -`` reads ``pipe:aws s3 cp s3://bucket/set/000042.stats.json -``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fovlm.data.tar_samples import ShardReadError, read_source

INDEX_VERSION = 1
STATS_SUFFIX = ".stats.json"
_TAR = re.compile(r"\.tar(?![\w.])")


class ShardStatsError(OSError):
    """A streamed shard whose stats cannot be found, read, or hold no usable index."""


def stats_source(source: str) -> str:
    """The stats of a shard source: the source with its last ``.tar`` (one not followed by a letter, digit or
    dot) replaced by ``.stats.json``.

    Raises:
        ShardStatsError: the source names no ``.tar``.
    """
    matches = list(_TAR.finditer(source))
    if not matches:
        raise ShardStatsError(
            f"cannot tell where the stats of shard {source!r} are: a streamed shard source must name its "
            f"'.tar' file, whose stats are the same source with '{STATS_SUFFIX}' in place of '.tar'"
        )
    last = matches[-1]
    return source[: last.start()] + STATS_SUFFIX + source[last.end() :]


def index_entry(keys: Sequence[str], frame_codes: Sequence[int], size: int) -> dict[str, Any]:
    """The ``index`` entry of a shard's stats: its sample keys and frame codes in file order, and its size."""
    if len(keys) != len(frame_codes):
        raise ValueError(f"{len(keys)} keys for {len(frame_codes)} frame codes")
    return {
        "version": INDEX_VERSION,
        "samples": len(keys),
        "bytes": int(size),
        "keys": list(keys),
        "frame_codes": [int(c) for c in frame_codes],
    }


def parse_index(stats: Mapping[str, Any], where: str) -> np.ndarray:
    """The frame codes (int16, one per sample) of a parsed stats file.

    Raises:
        ShardStatsError: naming ``where``, when the stats hold no index (written before shards carried one:
            ``python -m data_prep.stats_index`` adds it) or an inconsistent one.
    """
    entry = stats.get("index") if isinstance(stats, Mapping) else None
    if not isinstance(entry, Mapping):
        raise ShardStatsError(
            f"the stats {where} hold no shard index: write it with 'python -m data_prep.stats_index' beside the "
            f"local shards, then copy the stats files to where the shards are read from"
        )
    if entry.get("version") != INDEX_VERSION:
        raise ShardStatsError(f"the stats {where} hold an index of version {entry.get('version')!r}, "
                              f"not {INDEX_VERSION}")
    codes, keys = entry.get("frame_codes"), entry.get("keys")
    if not isinstance(codes, list) or not isinstance(keys, list) or not len(codes) == len(keys) == entry.get(
        "samples"
    ):
        raise ShardStatsError(f"the stats {where} hold an inconsistent index (samples, keys and frame_codes "
                              f"must agree)")
    try:
        return np.asarray(codes, dtype=np.int16)
    except (TypeError, ValueError, OverflowError) as err:
        raise ShardStatsError(f"the stats {where} hold invalid frame codes ({err})") from err


def read_stats_index(source: str) -> np.ndarray:
    """The frame codes of a streamed shard, read from its stats (:func:`stats_source`).

    Raises:
        ShardStatsError: naming the shard and where its stats were looked for.
    """
    where = f"of shard {source} ({stats_source(source)})"
    try:
        stats = json.loads(read_source(stats_source(source)))
    except ShardReadError as err:
        raise ShardStatsError(f"cannot read the stats {where}: {err}") from err
    except ValueError as err:  # UnicodeDecodeError is one
        raise ShardStatsError(f"the stats {where} are not valid JSON ({err})") from err
    return parse_index(stats, where)
