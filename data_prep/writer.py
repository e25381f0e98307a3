"""Shard writing: records -> samples (in N processes) -> webdataset shards + a manifest, resumable.

Input items are cut into consecutive chunks of ``samples_per_shard``; chunk ``i`` becomes shard
``{i:06d}.tar`` (fewer samples when items of it are skipped). Each shard is written by webdataset's
``ShardWriter`` under a ``.partial`` name and renamed once complete, after its stats file
(``{i:06d}.stats.json``: samples per source, skipped items with reasons, frame-count histogram, a
fingerprint of the chunk's items and of the conversion options, and the shard's index: its keys, the frame
code of every sample and its size, :mod:`fovlm.data.shard_stats`, from which the loader plans a shard it
streams without reading it). A re-run skips every shard whose tar exists and whose stats carry the same
fingerprint, so finished shards are never re-encoded (stats written before they carried the index get it from
a scan of the tar's headers and JSON); a run killed
half-way leaves only ``.partial`` files behind, which the next run overwrites; shards numbered beyond the
current input (from an earlier, longer run) are deleted, so the folder holds exactly what the manifest
describes.

Sample keys are ``{shard:06d}_{position:04d}`` (no dots, stable across re-runs); the item's own id
(video id, row number) goes into the manifest's lists and, where the source has one, the JSON.

Building a sample (decoding, resizing, JPEG encoding) runs in a ``multiprocessing`` pool of ``workers``
processes (0: in this process); results come back in input order and the main process writes them. An
item whose worker dies or hangs is skipped after ``item_timeout`` seconds (counted as ``timeout``), and
any exception while building one item skips that item (reason ``error``): one bad item never ends the
run. The manifest (``manifest.json``) covers the whole shard set, reused shards included.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from data_prep.media import SkipItem
from fovlm.data.shard_stats import index_entry
from fovlm.data.shards import frame_code, scan_samples

MANIFEST_NAME = "manifest.json"
_SHARD_FILE = re.compile(r"(\d{6})\.(tar|stats\.json|tar\.partial)")
MAX_LISTED_SKIPS = 10_000  # the manifest lists at most this many skipped items (all are counted)


@dataclass(frozen=True)
class Skip:
    """An input item found bad while reading the annotations (e.g. a malformed row)."""

    item: str
    reason: str
    detail: str


@dataclass
class Built:
    """What building one item produced: tar members (suffix -> bytes, ``json`` included) or a skip."""

    item: str
    members: dict[str, bytes] | None = None
    source: str | None = None
    num_frames: int = 0
    skip: Skip | None = None


@dataclass
class ShardStats:
    """Counts of one shard (also the unit the manifest sums)."""

    name: str
    fingerprint: str
    samples: int = 0
    per_source: Counter = field(default_factory=Counter)
    skipped: list[dict[str, str]] = field(default_factory=list)
    frame_histogram: Counter = field(default_factory=Counter)
    index: dict[str, Any] | None = None  # the shard's index (fovlm.data.shard_stats.index_entry)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "samples": self.samples,
            "per_source": dict(self.per_source),
            "skipped": self.skipped,
            "frame_histogram": {str(k): v for k, v in sorted(self.frame_histogram.items())},
            "index": self.index,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardStats:
        return cls(
            name=obj["name"],
            fingerprint=obj["fingerprint"],
            samples=obj["samples"],
            per_source=Counter(obj["per_source"]),
            skipped=list(obj["skipped"]),
            frame_histogram=Counter({int(k): v for k, v in obj["frame_histogram"].items()}),
            index=obj.get("index"),
        )


def item_id(record: Any) -> str:
    """The id an item is listed under: ``record.item`` (every record type and :class:`Skip` has one)."""
    return str(record.item)


def fingerprint(items: Iterable[Any], options: Any) -> str:
    """A hash of the items (their reprs: ids, texts, paths) and the conversion options."""
    digest = hashlib.sha256(repr(options).encode())
    for record in items:
        digest.update(repr(record).encode())
    return digest.hexdigest()[:16]


# -- worker side ---------------------------------------------------------------------------------------

_WORKER_BUILD: Callable[[str, Any], Built] | None = None


def _init_worker(build: Callable[[str, Any], Built]) -> None:
    global _WORKER_BUILD
    _WORKER_BUILD = build
    # Each worker decodes one video at a time; extra intra-op threads would only fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def safe_build(build: Callable[[str, Any], Built], key: str, record: Any) -> Built:
    """Build one item; any failure becomes a skip of that item, never an exception."""
    if isinstance(record, Skip):
        return Built(record.item, skip=record)
    try:
        return build(key, record)
    except SkipItem as err:
        return Built(item_id(record), skip=Skip(item_id(record), err.reason, err.detail))
    except Exception as err:  # a bug or an unexpected library error on this one item: count it, go on
        return Built(item_id(record), skip=Skip(item_id(record), "error", f"{type(err).__name__}: {err}"))


def _worker_build(task: tuple[str, Any]) -> Built:
    assert _WORKER_BUILD is not None
    return safe_build(_WORKER_BUILD, *task)


# -- main side -----------------------------------------------------------------------------------------


def _chunks(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


def shard_key(shard: int, position: int) -> str:
    return f"{shard:06d}_{position:04d}"


def _load_stats(path: Path) -> ShardStats | None:
    try:
        return ShardStats.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and shares the loaded modules; spawn where fork does not exist.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class _Results:
    """Ordered results of ``tasks``: in this process (workers=0) or from a pool with a bounded window."""

    def __init__(self, build, workers: int, item_timeout: float):
        self.build = build
        self.workers = workers
        self.item_timeout = item_timeout
        self.pool = None
        if workers > 0:
            self.pool = _pool_context().Pool(workers, initializer=_init_worker, initargs=(build,))

    def run(self, tasks: Iterator[tuple[str, Any]]) -> Iterator[Built]:
        if self.pool is None:
            for key, record in tasks:
                yield safe_build(self.build, key, record)
            return
        window: deque = deque()
        limit = 4 * self.workers
        for task in tasks:
            window.append((task, self.pool.apply_async(_worker_build, (task,))))
            if len(window) >= limit:
                yield self._collect(*window.popleft())
        while window:
            yield self._collect(*window.popleft())

    def _collect(self, task: tuple[str, Any], result) -> Built:
        record = task[1]
        try:
            return result.get(timeout=self.item_timeout)
        except multiprocessing.TimeoutError:
            detail = f"no result after {self.item_timeout:.0f} s (the worker hung or died)"
            return Built(item_id(record), skip=Skip(item_id(record), "timeout", detail))
        except Exception as err:  # e.g. a result that could not be pickled back
            return Built(item_id(record), skip=Skip(item_id(record), "error", f"{type(err).__name__}: {err}"))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _ShardSet:
    """One run over a shard set's folder: which chunks become shards, and the shards reused and written.

    Args:
        output: the shard set's folder.
        options: the conversion options (their repr enters each chunk's fingerprint).
        bar: progress bar, advanced by one per input item (a whole chunk at once for a reused shard).
    """

    def __init__(self, output: Path, options: Any, bar: tqdm):
        self.output = output
        self.options = options
        self.bar = bar
        self.stats: list[ShardStats] = []  # every shard of the set, reused or written
        self.reused: list[str] = []
        self.pending: list[tuple[int, str, list[Any]]] = []  # chunks handed to the builders, not yet written
        self.chunk_count = 0
        self.written = 0
        self.frames_written = 0
        self.videos_written = 0

    def tasks(self, records: Iterable[Any], samples_per_shard: int) -> Iterator[tuple[str, Any]]:
        """``(key, record)`` of every item whose shard must be built; reused shards are recorded instead."""
        for index, chunk in enumerate(_chunks(records, samples_per_shard)):
            self.chunk_count = index + 1
            digest = fingerprint(chunk, self.options)
            if self._reuse(index, digest, len(chunk)):
                continue
            self.pending.append((index, digest, chunk))
            for position, record in enumerate(chunk):
                yield shard_key(index, position), record

    def _reuse(self, index: int, digest: str, items: int) -> bool:
        """Keep shard ``index`` when its tar exists and its stats carry the chunk's fingerprint (stats without
        the shard's index get it from a scan of the tar)."""
        name = f"{index:06d}.tar"
        stats_path = self.output / f"{index:06d}.stats.json"
        stats = _load_stats(stats_path)
        if not ((self.output / name).is_file() and stats is not None and stats.fingerprint == digest):
            return False
        if stats.index is None:
            keys, codes, error = scan_samples(str(self.output / name))
            if error is not None or len(keys) != stats.samples:
                return False  # a damaged tar: written again
            stats.index = index_entry(keys, codes, (self.output / name).stat().st_size)
            stats_path.write_text(json.dumps(stats.to_json(), indent=1))
        self.stats.append(stats)
        self.reused.append(name)
        self.bar.update(items)
        return True

    def write_next(self, results: Iterator[Built]) -> bool:
        """Write the oldest pending chunk's shard from the next results; False once ``results`` is exhausted."""
        try:
            first = next(results)
        except StopIteration:
            return False
        index, digest, chunk = self.pending.pop(0)
        stats = ShardStats(f"{index:06d}.tar", digest)
        keys: list[str] = []
        codes: list[int] = []
        # An out-of-date tar goes first, so that the new stats can never sit beside old samples.
        (self.output / stats.name).unlink(missing_ok=True)
        partial = self.output / f"{index:06d}.tar.partial"
        writer = wds.ShardWriter(str(self.output / "%06d.tar.partial"), maxcount=len(chunk) + 1, start_shard=index,
                                 verbose=0, mtime=0.0)
        try:
            for position in range(len(chunk)):
                built = first if position == 0 else next(results)
                self.bar.update(1)
                key = shard_key(index, position)
                if self._add(writer, stats, key, built):
                    keys.append(key)
                    codes.append(frame_code({name.lower(): data for name, data in built.members.items()}, key))
        finally:
            writer.close()
        stats.index = index_entry(keys, codes, partial.stat().st_size)
        # Stats first, tar last: a tar under its final name always has its stats beside it.
        (self.output / f"{index:06d}.stats.json").write_text(json.dumps(stats.to_json(), indent=1))
        partial.replace(self.output / stats.name)
        self.stats.append(stats)
        self.written += 1
        return True

    def _add(self, writer: wds.ShardWriter, stats: ShardStats, key: str, built: Built) -> bool:
        """Write one built sample under ``key`` and count it (True), or list its skip (False)."""
        if built.skip is not None:
            if len(stats.skipped) < MAX_LISTED_SKIPS:
                stats.skipped.append({"item": built.skip.item, "reason": built.skip.reason,
                                      "detail": built.skip.detail[:500]})
            return False
        assert built.members is not None
        writer.write({"__key__": key, **built.members})
        stats.samples += 1
        stats.per_source[built.source or "unknown"] += 1
        stats.frame_histogram[built.num_frames] += 1
        self.frames_written += built.num_frames
        self.videos_written += built.num_frames > 0
        return True


def write_shards(
    records: Iterable[Any],
    output: str | os.PathLike,
    build: Callable[[str, Any], Built],
    options: Any,
    *,
    samples_per_shard: int = 1000,
    workers: int = 1,
    item_timeout: float = 600.0,
    progress: bool = True,
    description: str = "",
    total: int | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert ``records`` with ``build(key, record) -> Built`` into shards under ``output``.

    Args:
        records: items to convert (picklable; each has an ``item`` id), :class:`Skip` for bad rows.
        output: folder of the shard set (created).
        build: module-level function building one sample (runs in the worker processes).
        options: the conversion options (their repr enters each shard's fingerprint).
        samples_per_shard: input items per shard.
        workers: processes building samples; 0 builds in this process.
        item_timeout: seconds to wait for one item's result before skipping it.
        progress: show a tqdm progress bar (stderr).
        description: the progress bar's label.
        total: number of items, for the progress bar (taken from ``len(records)`` when it has one).
        info: further entries for the manifest (e.g. the source and input it was made from).

    Returns:
        The manifest (also written to ``output/manifest.json``).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if total is None and hasattr(records, "__len__"):
        total = len(records)  # type: ignore[arg-type]
    started = time.perf_counter()
    bar = tqdm(total=total, desc=description or output.name, unit="item", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    shards = _ShardSet(output, options, bar)
    results = _Results(build, workers, item_timeout)
    try:
        stream = results.run(shards.tasks(records, samples_per_shard))
        while shards.write_next(stream):
            pass
    finally:
        results.close()
        bar.close()
    removed = _remove_stale(output, shards.chunk_count)
    seconds = time.perf_counter() - started
    manifest = _manifest(shards.stats, shards.reused, shards.written, seconds, shards.videos_written,
                         shards.frames_written, options)
    manifest["run"]["shards_removed"] = removed
    manifest = {**(info or {}), **manifest}
    (output / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def _remove_stale(output: Path, count: int) -> list[str]:
    """Delete the shards (and stats) numbered ``count`` and above, left by an earlier run over more input:
    the folder holds exactly the shard set its manifest describes."""
    removed = []
    for path in sorted(output.iterdir()):
        match = _SHARD_FILE.fullmatch(path.name)
        if match and int(match.group(1)) >= count:
            path.unlink()
            removed.append(path.name)
    return removed


def _manifest(stats: list[ShardStats], reused: list[str], written: int, seconds: float, media_samples: int,
              frames: int, options: Any) -> dict[str, Any]:
    stats = sorted(stats, key=lambda s: s.name)
    per_source: Counter = Counter()
    reasons: Counter = Counter()
    histogram: Counter = Counter()
    skipped: list[dict[str, str]] = []
    for s in stats:
        per_source.update(s.per_source)
        histogram.update(s.frame_histogram)
        for item in s.skipped:
            reasons[item["reason"]] += 1
        skipped.extend(s.skipped)
    return {
        "shards": [{"name": s.name, "samples": s.samples} for s in stats],
        "samples": sum(s.samples for s in stats),
        "samples_per_source": dict(sorted(per_source.items())),
        "skipped": dict(sorted(reasons.items())),
        "skipped_items": skipped[:MAX_LISTED_SKIPS],
        "frame_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "run": {
            "shards_written": written,
            "shards_reused": reused,
            "seconds": round(seconds, 3),
            "samples_with_frames_written": media_samples,
            "frames_written": frames,
        },
        "options": repr(options),
    }
