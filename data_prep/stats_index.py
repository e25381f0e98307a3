"""``python -m data_prep.stats_index PATTERN ...``: write the shard index into the stats file of local shards.

The loader plans a streamed shard (a ``pipe:`` command or a URL) from the index in the stats file beside it
(:mod:`fovlm.data.shard_stats`), never by reading the shard. ``data_prep`` writes that index with every shard;
this command adds it for shards written by other tools (or by an older ``data_prep``): for every local tar
``X.tar`` it scans the member headers and the small JSON and text members (media are not read) and writes
``X.stats.json`` (keeping the other fields of an existing one). Then copy the stats files next to the shards
wherever they are read from. A damaged tar gets no stats: it is listed, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fovlm.data.shard_stats import index_entry, stats_source
from fovlm.data.shards import expand_shards, is_streamed, scan_samples


def write_stats_index(path: str | Path) -> dict[str, Any]:
    """Scan a local tar and write its index into its stats file (created, or updated keeping other fields).

    Returns:
        The stats as written.

    Raises:
        OSError: the tar is damaged or truncated (its stats are left as they were).
    """
    path = Path(path)
    keys, codes, error = scan_samples(str(path))
    if error is not None:
        raise OSError(error)
    stats_path = Path(stats_source(str(path)))
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        stats = {}
    if not isinstance(stats, dict):
        stats = {}
    stats.setdefault("name", path.name)
    stats.setdefault("samples", len(keys))
    stats["index"] = index_entry(keys, codes, path.stat().st_size)
    stats_path.write_text(json.dumps(stats, indent=1))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.stats_index",
        description="Write the shard index (keys and frame counts of every sample) into the X.stats.json beside "
        "every local shard X.tar, so that the shards can be streamed (pipe: commands, URLs) without being "
        "read to be planned.",
    )
    parser.add_argument("patterns", nargs="+", help="local shards: files, globs or brace ranges (data/{000..009}.tar)")
    args = parser.parse_args(argv)
    if any(is_streamed(p) for p in args.patterns):
        parser.error("give the local shards (index them before uploading them)")
    failed = 0
    for path in expand_shards(args.patterns):
        try:
            stats = write_stats_index(path)
        except OSError as err:
            print(f"skipped: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{stats_source(path)}: {stats['index']['samples']} samples")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
