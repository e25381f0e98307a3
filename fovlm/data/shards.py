"""Shard sets: expanding shard patterns, and the shard index the epoch plan is computed from.

A shard is a webdataset tar (:mod:`fovlm.data.tar_samples` reads its samples): a local file, or a streamed
source, i.e. a ``pipe:`` command or a URL (``http://``, ``https://``, ...).

The index holds, per shard, one frame-count code per sample; :func:`planned_frames` turns a code into a frame
count under a run's frame settings. A local shard is indexed from its member names and its small JSON and text
members alone (the media are never read); the index is cached per file path, size and mtime, and a shard that is
unreadable or truncated keeps its readable samples and carries the error. A streamed shard is indexed from the
stats file written beside it (:mod:`fovlm.data.shard_stats`), never by reading the shard; its damage, if any,
is found when it is read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np

from fovlm.data.contract import FrameSettings
from fovlm.data.frames import select_frame_times
from fovlm.data.schema import SampleError, frame_fields, parse_sample, single_image_field, video_field
from fovlm.data.shard_stats import read_stats_index
from fovlm.data.tar_samples import (  # noqa: F401 (ShardReadError and iter_tar_samples: importable from here)
    STREAM_SCHEMES,
    ShardReadError,
    is_streamed,
    iter_tar_samples,
    url_scheme,
)

log = logging.getLogger(__name__)

# Frame-count codes stored in the index, resolved with a run's frame settings by planned_frames.
_CODE_IMAGE = -2  # a single image (replicated to image_frames)
_CODE_UNKNOWN_VIDEO = -1  # an mp4 without a duration in its JSON (planned as max_frames)


# ----------------------------------------------------------------------------------------------------------
# Shard patterns


def _check_scheme(pattern: str) -> None:
    scheme = url_scheme(pattern)
    if scheme is not None and scheme != "pipe" and scheme not in STREAM_SCHEMES:
        raise FileNotFoundError(
            f"shard pattern {pattern!r} names no file this loader reads: the scheme {scheme!r} is not read "
            f"directly; give a local path, a command that writes the tar to its output (e.g. "
            f"'pipe:aws s3 cp s3://bucket/000000.tar -') or a URL of one of the schemes "
            f"{', '.join(sorted(STREAM_SCHEMES))}"
        )


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Expand shard patterns: brace ranges (``shard-{000..009}.tar``), globs (``data/*.tar``), or lists of
    them.

    Each pattern's matches are sorted; the lists are concatenated in order, without duplicates. A streamed
    pattern (a ``pipe:`` command or URL) is brace-expanded only, in order (nothing to list or glob): whether
    its shards exist is found when their stats are read.

    Raises:
        FileNotFoundError: naming the first local pattern (or brace expansion) that matches no file, or a URL
            of a scheme that is not read directly (``s3://``: give a ``pipe:`` command).
    """
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    out: list[str] = []
    for pattern in map(str, patterns):
        _check_scheme(pattern)
        if is_streamed(pattern):
            out += braceexpand.braceexpand(pattern)
            continue
        pattern = os.path.expanduser(pattern)
        for item in braceexpand.braceexpand(pattern):
            if glob.has_magic(item):
                found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            else:
                found = [item] if os.path.isfile(item) else []
            if not found:
                where = f"{item!r} (from {pattern!r})" if item != pattern else repr(pattern)
                raise FileNotFoundError(f"shard pattern {where} matches no file")
            out += found
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


# ----------------------------------------------------------------------------------------------------------
# The shard index: samples per shard and a frame-count code per sample (cached)


@dataclass
class ShardInfo:
    """What the plan needs to know about one shard."""

    path: str
    frame_codes: np.ndarray  # int16 [num_samples]: frames (>= 0), _CODE_IMAGE or _CODE_UNKNOWN_VIDEO
    error: str | None = None  # why the shard is unreadable or shorter than its members say

    @property
    def num_samples(self) -> int:
        return int(self.frame_codes.shape[0])


def frame_code(members: Mapping[str, bytes], key: str) -> int:
    """The index code of one sample from its members (suffix -> data; only ``json`` and ``txt`` are read): its
    frame count, ``-2`` for a single image, ``-1`` for a video file whose JSON gives no duration, 0 for text
    and for an invalid sample (skipped when read)."""
    names = list(members)
    try:
        sample = parse_sample(members.get("json", b""), key, names, members.get("txt"))
        media = sample.media
        duration = sample.duration
    except SampleError:
        return 0  # an invalid sample is skipped at read time; it occupies no frames
    if media == "text":
        return 0
    if media == "image":
        return _CODE_IMAGE
    if video_field(names):
        if duration is None:
            return _CODE_UNKNOWN_VIDEO
        return len(select_frame_times(duration))
    frames = frame_fields(names)
    return len(frames) if frames else (1 if single_image_field(names) else 0)


def planned_frames(code: int, frames: FrameSettings) -> int:
    """The frames a sample with index code ``code`` gives under ``frames``: ``image_frames`` for an image,
    ``max_frames`` for an mp4 of unknown duration, else its frame count capped at ``max_frames``."""
    if code == _CODE_IMAGE:
        return frames.image_frames
    if code == _CODE_UNKNOWN_VIDEO:
        return frames.max_frames
    return min(code, frames.max_frames)


def scan_samples(path: str) -> tuple[list[str], list[int], str | None]:
    """Read a shard's member headers and its small JSON/text members: the keys and frame codes of its samples,
    and why it stops early (None for a complete shard).

    Media members are listed (their names decide the frame count) but their data is not read."""
    keys: list[str] = []
    codes: list[int] = []
    try:
        for _, key, members in iter_tar_samples(path, fields=lambda name: name in ("json", "txt")):
            keys.append(key)
            codes.append(frame_code(members or {}, key))
    except ShardReadError as err:
        return keys, codes, str(err)
    return keys, codes, None


def scan_shard(path: str) -> ShardInfo:
    """Index a shard by reading it (:func:`scan_samples`)."""
    _, codes, error = scan_samples(path)
    return ShardInfo(path, np.asarray(codes, dtype=np.int16), error)


def _cache_name(path: str) -> str:
    stat = os.stat(path)
    ident = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|v1"
    return hashlib.sha1(ident.encode()).hexdigest() + ".json"


def default_index_cache() -> Path:
    return Path(os.environ.get("FOVLM_CACHE", Path.home() / ".cache" / "fovlm")) / "shard_index"


def build_index(
    paths: Sequence[str], cache_dir: str | os.PathLike | None = None, threads: int = 4
) -> dict[str, ShardInfo]:
    """Index every shard: a local one by scanning it (cached per file path, size and mtime; a damaged shard is
    re-scanned each time), a streamed one from its stats (read each time, ``threads`` at once, at least 16).

    Raises:
        ShardStatsError: a streamed shard's stats cannot be found or read, or hold no index.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_index_cache()

    def one(path: str) -> ShardInfo:
        if is_streamed(path):
            return ShardInfo(path, read_stats_index(path))
        cached = cache / _cache_name(path)
        try:
            data = json.loads(cached.read_text())
            return ShardInfo(path, np.asarray(data["frame_codes"], dtype=np.int16), data.get("error"))
        except (OSError, ValueError, KeyError):
            pass
        info = scan_shard(path)
        if info.error is None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                # Atomic: concurrent ranks may index the same shard.
                with tempfile.NamedTemporaryFile("w", dir=cache, delete=False, suffix=".tmp") as tmp:
                    json.dump({"path": path, "frame_codes": info.frame_codes.tolist()}, tmp)
                os.replace(tmp.name, cached)
            except OSError as err:
                log.warning("cannot cache the shard index in %s: %s", cache, err)
        return info

    if any(is_streamed(p) for p in paths):
        threads = max(threads, 16)  # stats downloads wait on the network, not on this machine
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        infos = list(pool.map(one, paths))
    return {info.path: info for info in infos}
