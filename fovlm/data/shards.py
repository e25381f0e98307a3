"""Shards on disk: expanding shard patterns, reading samples out of a tar, and the cached shard index.

The shard format is webdataset's (members grouped by the key before the first dot, as
``webdataset.tariterators.base_plus_ext``); the tars are read with ``tarfile`` in seek mode because a worker's
share of an epoch starts mid-shard (a tar is entered at a sample by skipping member headers without reading
their data), and shards must therefore be local (or mounted) files.

The index holds, per shard, one frame-count code per sample, found from the member names and the small JSON
and text members alone (the media are never read); :func:`planned_frames` turns a code into a frame count
under a run's frame settings. It is cached per file path, size and mtime; a shard that is unreadable or
truncated keeps its readable samples and carries the error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
from webdataset.tariterators import base_plus_ext

from fovlm.data.contract import FrameSettings
from fovlm.data.frames import select_frame_times
from fovlm.data.schema import SampleError, frame_fields, parse_sample, single_image_field, video_field

log = logging.getLogger(__name__)

# Frame-count codes stored in the index, resolved with a run's frame settings by planned_frames.
_CODE_IMAGE = -2  # a single image (replicated to image_frames)
_CODE_UNKNOWN_VIDEO = -1  # an mp4 without a duration in its JSON (planned as max_frames)


# ----------------------------------------------------------------------------------------------------------
# Shard patterns


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Expand shard patterns: brace ranges (``shard-{000..009}.tar``), globs (``data/*.tar``), or lists of
    them.

    Each pattern's matches are sorted; the lists are concatenated in order, without duplicates.

    Raises:
        FileNotFoundError: naming the first pattern (or brace expansion) that matches no file.
    """
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matched: list[str] = []
        for item in braceexpand.braceexpand(pattern):
            if glob.has_magic(item):
                found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            else:
                found = [item] if os.path.isfile(item) else []
            if not found:
                where = f"{item!r} (from {pattern!r})" if item != pattern else repr(pattern)
                raise FileNotFoundError(f"shard pattern {where} matches no file")
            matched += found
        out += matched
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


# ----------------------------------------------------------------------------------------------------------
# Tar reading (webdataset's grouping rules)


class ShardReadError(OSError):
    """A shard that cannot be opened, or that ends early (truncated)."""


def _split_member(name: str) -> tuple[str | None, str]:
    key, field_name = base_plus_ext(name)
    return key, (field_name or "").lower()


def iter_tar_samples(
    path: str,
    start: int = 0,
    stop: int | None = None,
    load: Callable[[int], bool] | None = None,
    fields: Callable[[str], bool] | None = None,
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield ``(index, key, members)`` for samples ``start <= index < stop`` of a tar, in file order.

    Samples are consecutive members sharing a key (webdataset rules; member suffixes lower-cased). Members are
    read only for samples where ``load(index)`` is true (otherwise ``None`` is yielded: tarfile seeks over
    their data); if ``fields`` is given, members whose suffix it rejects are listed with empty data.

    Raises:
        ShardReadError: the file is not a readable tar, or it is truncated; samples completed before the
            damage have been yielded, the partial one is not.
    """
    try:
        size = os.path.getsize(path)
        handle = open(path, "rb")  # noqa: SIM115 (closed in finally; the tarfile borrows it)
    except OSError as err:
        raise ShardReadError(f"cannot open shard {path}: {err}") from err
    index, key, members = -1, None, None
    try:
        try:
            archive = tarfile.open(fileobj=handle, mode="r:")
        except (tarfile.TarError, EOFError) as err:
            raise ShardReadError(f"shard {path} is not a readable tar ({err})") from err
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, EOFError, OSError) as err:
                raise ShardReadError(
                    f"shard {path} is truncated or damaged after sample {index} ({err})"
                ) from err
            if info is None:
                # A complete tar ends with two zero blocks; a file that stops right at a member boundary
                # was cut off there (its last sample may have lost members, so it is not yielded).
                if size - archive.offset < 2 * tarfile.BLOCKSIZE:
                    raise ShardReadError(
                        f"shard {path} is truncated after sample {index} (no end-of-archive)"
                    )
                break
            # A member whose data runs past the end of the file: the tar was cut off.
            if info.offset_data + info.size > size:
                raise ShardReadError(f"shard {path} is truncated inside sample {index + 1}")
            if not info.isreg():
                continue
            member_key, field_name = _split_member(info.name)
            if member_key is None or os.path.basename(member_key).startswith("__"):
                continue
            if member_key != key:
                if key is not None and index >= start:
                    yield index, key, members
                index, key = index + 1, member_key
                if stop is not None and index >= stop:
                    return
                members = {} if index >= start and (load is None or load(index)) else None
            if members is not None and fields is not None and not fields(field_name):
                members[field_name] = b""
            elif members is not None:
                reader = archive.extractfile(info)
                try:
                    members[field_name] = reader.read() if reader is not None else b""
                except (tarfile.TarError, EOFError, OSError) as err:
                    raise ShardReadError(f"shard {path} is truncated inside sample {index} ({err})") from err
        if key is not None and index >= start:
            yield index, key, members
    finally:
        handle.close()


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


def _frame_code(members: Mapping[str, bytes], key: str) -> int:
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


def scan_shard(path: str) -> ShardInfo:
    """Read a shard's member headers and its small JSON/text members to count samples and their frames.

    Media members are listed (their names decide the frame count) but their data is not read."""
    codes: list[int] = []
    error = None
    try:
        for _, key, members in iter_tar_samples(path, fields=lambda name: name in ("json", "txt")):
            codes.append(_frame_code(members, key))
    except ShardReadError as err:
        error = str(err)
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
    """Index every shard (cached per file path, size and mtime; a damaged shard is re-scanned each time)."""
    cache = Path(cache_dir) if cache_dir is not None else default_index_cache()

    def one(path: str) -> ShardInfo:
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

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        infos = list(pool.map(one, paths))
    return {info.path: info for info in infos}
