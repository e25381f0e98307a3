"""Streaming shards: expansion, an index of sample counts, the per-epoch plan, reading, resumable iteration.

How an epoch is laid out (all of it a pure function of the shard index, the seed and the epoch, so every rank
and every worker computes the same plan without talking to each other):

1. **Groups.** Shards form named groups (e.g. video, image, text). Each group is an endless stream of
   passes; pass ``p`` is the group's shard list shuffled with ``(seed, group, p)``, flattened to samples.
   Epoch ``e`` takes ``count_g`` consecutive samples of that stream. With natural ratios ``count_g`` is the
   group's size, so epoch ``e`` is exactly pass ``e``: every sample once, shards shuffled per (seed, epoch).
   Explicit weights (e.g. 55/30/15) or text retention (``text_ratio`` of all samples) change ``count_g``;
   a group then runs through its passes at its own pace, and still reads each sample once per pass.
2. **Split by rank, then by worker.** Each group's epoch range is cut into ``world_size * num_workers``
   contiguous slots, rank-major (slot = rank * num_workers + worker), at *sample* granularity: slot sizes
   differ by at most one sample, and a slot reads a contiguous run of shards (the first and last possibly
   in part; a tar is entered at a sample by skipping member headers without reading their data).
3. **Mixing, shuffling.** Inside a slot the groups are interleaved at sample level in a seeded random order
   (an exact share per group, so ``text_ratio`` holds in every slot); a bounded shuffle buffer
   (``shuffle_buffer`` samples, seeded) reorders the stream. Both are simulated on sample ids to get the
   emission order; the reader then holds at most ``shuffle_buffer`` raw samples.
4. **Batches.** The emission order is cut into batches of ``batch_size`` samples, optionally capped at
   ``max_frames_per_batch`` frames (frame counts come from the index), and every rank is brought to the same
   batch count by splitting its largest batches (never by repeating samples, unless a rank has fewer
   samples than batches, e.g. ``batch_size=1`` with uneven counts; such repeats are counted as ``padded``).
   So across ranks x workers every sample is read exactly once per epoch and DDP never hangs at an epoch
   end; ranks may see batches that differ in size by a sample or so.
5. **Resume.** A worker's state is its epoch, the batches it yielded, the next planned batch and the
   samples read but held back (by plan position). Restoring replays the plan, passes over the batches
   already yielded without reading their data, re-reads the held samples and continues with the next
   batch. torchdata's ``StatefulDataLoader`` collects these states from the workers; Lightning stores a
   stateful loader's state in checkpoints and restores it before iterating. The epoch comes from the
   Trainer (``epoch_fn``), or the loader counts its iterations.

Bad data never stops training: an undecodable sample is skipped and counted by reason; a shard that is
unreadable or truncated keeps its readable samples and is reported. A planned batch whose samples all fail
is covered by splitting the previous (or next) good batch, so the batch count stays the plan's without
repeating samples. Counts travel with the batches (``_counts``) to the main process, where
:class:`ShardLoader` removes them from the batch, adds them up and warns once per reason.

The shard format is webdataset's (members grouped by the key before the first dot, as
``webdataset.tariterators.base_plus_ext``); the tars are read with ``tarfile`` in seek mode because a slot
starts mid-shard, and shards must therefore be local (or mounted) files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from webdataset.tariterators import base_plus_ext

from fovlm.data.frames import select_frame_times
from fovlm.data.schema import SampleError, frame_fields, parse_sample, single_image_field, video_field
from fovlm.data.workers import WorkerInit, stop_signals_blocked
from fovlm.rank_state import gather_by_rank, is_gathered, pick_rank

log = logging.getLogger(__name__)

COUNTS_KEY = "_counts"
"""Batch key carrying ``{reason: count}`` of the samples skipped (or padded / truncated) in that batch."""
EXAMPLES_KEY = "_count_examples"
"""Batch key carrying one example message per reason."""

# Frame-count codes stored in the index, resolved with the DataModule's settings at plan time.
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


# ----------------------------------------------------------------------------------------------------------
# The plan (pure)


@dataclass(frozen=True)
class ShardGroup:
    """A named list of shards (how many samples it gives per epoch is the planner's ``counts``)."""

    name: str
    shards: tuple[str, ...]


@dataclass(frozen=True)
class Ref:
    """One sample: shard ``shard`` of group ``group``, sample ``index`` within that shard."""

    group: int
    shard: int
    index: int


@dataclass
class SlotPlan:
    """What one worker of one rank does in an epoch."""

    inputs: list[Ref]  # reading order
    order: list[int]  # emission order: indices into ``inputs``
    bounds: list[int] = field(default_factory=list)  # batch b is order[bounds[b]:bounds[b+1]]
    padded: int = 0  # emissions that repeat an already planned sample

    @property
    def num_batches(self) -> int:
        return max(0, len(self.bounds) - 1)


@dataclass(frozen=True)
class PlanConfig:
    """Everything (besides the index) that decides an epoch's plan."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    max_frames_per_batch: int | None = None
    image_frames: int = 8
    max_frames: int = 64


class EpochPlanner:
    """Computes the per-epoch plan of :mod:`this module's docstring <fovlm.data.pipeline>` from an index."""

    def __init__(
        self,
        groups: Sequence[ShardGroup],
        index: Mapping[str, ShardInfo],
        counts: Sequence[int],
        config: PlanConfig,
    ):
        self.groups = list(groups)
        self.config = config
        self.counts = list(counts)  # samples taken from each group per epoch
        self.sizes = [
            np.asarray([index[p].num_samples for p in g.shards], dtype=np.int64) for g in self.groups
        ]
        self.codes = [[index[p].frame_codes for p in g.shards] for g in self.groups]
        self.totals = [int(s.sum()) for s in self.sizes]
        for g, (count, total) in enumerate(zip(self.counts, self.totals, strict=True)):
            if count > 0 and total == 0:
                raise ValueError(f"shard group {self.groups[g].name!r} has no readable sample")

    # -- group streams ---------------------------------------------------------------------------------------

    def _pass_order(self, group: int, pass_index: int) -> np.ndarray:
        n = len(self.sizes[group])
        if not self.config.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.config.seed, group, pass_index, 0x5A4D])
        return rng.permutation(n)

    def _stream_refs(self, group: int, lo: int, hi: int) -> list[Ref]:
        """Samples ``lo <= position < hi`` of a group's endless stream of shuffled passes."""
        total = self.totals[group]
        refs: list[Ref] = []
        position = lo
        while position < hi:
            pass_index, offset = divmod(position, total)
            order = self._pass_order(group, pass_index)
            sizes = self.sizes[group][order]
            ends = np.cumsum(sizes)
            k = int(np.searchsorted(ends, offset, side="right"))
            while position < hi and k < len(order):
                shard = int(order[k])
                begin = int(ends[k] - sizes[k])
                first = offset - begin
                take = min(int(sizes[k]) - first, hi - position)
                refs += [Ref(group, shard, i) for i in range(first, first + take)]
                position += take
                offset += take
                k += 1
        return refs

    @staticmethod
    def _cut(total: int, slots: int, slot: int) -> tuple[int, int]:
        return total * slot // slots, total * (slot + 1) // slots

    def slot_inputs(self, epoch: int, slot: int, slots: int) -> list[Ref]:
        """The samples a slot reads this epoch, groups interleaved at sample level (seeded)."""
        pieces = []
        for g, count in enumerate(self.counts):
            lo, hi = self._cut(count, slots, slot)
            pieces.append(self._stream_refs(g, epoch * count + lo, epoch * count + hi))
        labels = np.concatenate(
            [np.full(len(p), g, dtype=np.int64) for g, p in enumerate(pieces)] or [np.zeros(0)]
        )
        if self.config.shuffle and len(pieces) > 1:
            np.random.default_rng([self.config.seed, epoch, slot, slots, 0x4D49]).shuffle(labels)
        cursors = [0] * len(pieces)
        out = []
        for g in labels.tolist():
            out.append(pieces[g][cursors[g]])
            cursors[g] += 1
        return out

    def emission_order(self, n: int, epoch: int, slot: int, slots: int) -> list[int]:
        """The bounded shuffle buffer, simulated on positions: at most ``shuffle_buffer`` held at once."""
        buffer_size = self.config.shuffle_buffer
        if not self.config.shuffle or buffer_size <= 1 or n <= 1:
            return list(range(n))
        rng = np.random.default_rng([self.config.seed, epoch, slot, slots, 0x5348])
        held = list(range(min(buffer_size, n)))
        picks = rng.integers(0, len(held), size=max(0, n - len(held))).tolist()
        out = []
        for incoming, j in zip(range(len(held), n), picks, strict=True):
            out.append(held[j])
            held[j] = incoming
        rng.shuffle(held)
        return out + held

    def frames_of(self, ref: Ref) -> int:
        code = int(self.codes[ref.group][ref.shard][ref.index])
        if code == _CODE_IMAGE:
            return self.config.image_frames
        if code == _CODE_UNKNOWN_VIDEO:
            return self.config.max_frames
        return min(code, self.config.max_frames)

    def _batches(self, inputs: list[Ref], order: list[int]) -> list[int]:
        size, budget = self.config.batch_size, self.config.max_frames_per_batch
        if budget is None:
            return list(range(0, len(order), size)) + [len(order)] if order else [0]
        bounds, used, count = [0], 0, 0
        for i, pos in enumerate(order):
            frames = self.frames_of(inputs[pos])
            if count and (count == size or used + frames > budget):
                bounds.append(i)
                used, count = 0, 0
            used += frames
            count += 1
        if count:
            bounds.append(len(order))
        return bounds

    def slot_plan(self, epoch: int, slot: int, slots: int) -> SlotPlan:
        inputs = self.slot_inputs(epoch, slot, slots)
        order = self.emission_order(len(inputs), epoch, slot, slots)
        return SlotPlan(inputs, order, self._batches(inputs, order))

    def _batch_sizes(self, epoch: int, slot: int, slots: int) -> list[int]:
        """Batch sizes of a slot before equalisation (cheap when there is no frame budget)."""
        if self.config.max_frames_per_batch is not None:
            plan = self.slot_plan(epoch, slot, slots)
            return [b - a for a, b in zip(plan.bounds[:-1], plan.bounds[1:], strict=True)]
        n = sum(
            hi - lo
            for hi, lo in ((self._cut(c, slots, slot)[1], self._cut(c, slots, slot)[0]) for c in self.counts)
        )
        full, rest = divmod(n, self.config.batch_size)
        return [self.config.batch_size] * full + ([rest] if rest else [])

    def rank_plan(
        self, epoch: int, rank: int, world_size: int, num_workers: int
    ) -> tuple[list[list[int]], int]:
        """Batch sizes of every worker of ``rank`` after equalisation, and the common batch count per rank.

        A rank with fewer batches than the busiest rank splits its largest batch (the worker holding it,
        lowest worker id on ties) in two until the counts agree; only if every batch already holds a single
        sample does a worker get an extra batch that repeats a sample (``padded``)."""
        slots = world_size * num_workers
        per_rank = []
        for r in range(world_size):
            per_rank.append(
                [self._batch_sizes(epoch, r * num_workers + w, slots) for w in range(num_workers)]
            )
        target = max(sum(len(s) for s in workers) for workers in per_rank)
        sizes = per_rank[rank]
        while sum(len(s) for s in sizes) < target:
            best = max(((max(s) if s else 0, -w) for w, s in enumerate(sizes)))
            if best[0] >= 2:
                w = -best[1]
                j = max(range(len(sizes[w])), key=lambda i: (sizes[w][i], i))
                big = sizes[w][j]
                sizes[w][j : j + 1] = [math.ceil(big / 2), big // 2]
            else:
                w = min(range(num_workers), key=lambda i: (len(sizes[i]), i))
                sizes[w].append(-1)  # a padded batch of one repeated sample
        return sizes, target

    def worker_plan(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> SlotPlan:
        """The final plan of one worker: its batches, equalised across ranks."""
        slots = world_size * num_workers
        slot = rank * num_workers + worker
        plan = self.slot_plan(epoch, slot, slots)
        sizes = self.rank_plan(epoch, rank, world_size, num_workers)[0][worker]
        bounds, at = [0], 0
        for size in sizes:
            if size < 0:
                # Repeat this slot's first sample, or else the epoch's first sample of slot 0.
                donor = plan.inputs[plan.order[0]] if plan.order else self.slot_inputs(epoch, 0, slots)[0]
                plan.inputs.append(donor)
                plan.order.append(len(plan.inputs) - 1)
                plan.padded += 1
                size = 1
            at += size
            bounds.append(at)
        if at != len(plan.order):
            raise RuntimeError(f"internal plan error: {at} planned emissions for {len(plan.order)} samples")
        plan.bounds = bounds
        return plan

    def batches_per_rank(self, epoch: int, world_size: int, num_workers: int) -> int:
        return self.rank_plan(epoch, 0, world_size, num_workers)[1]


def group_counts(
    totals: Sequence[int],
    weights: Sequence[float | None],
    text_groups: Sequence[bool],
    text_ratio: float,
    samples_per_epoch: int | None = None,
) -> list[int]:
    """Samples per epoch of each group.

    Non-text groups: their natural sizes when no weight is given (every sample once per epoch), otherwise
    ``weight / sum(weights)`` of ``samples_per_epoch`` (default: the non-text groups' total). Text groups
    share ``text_ratio`` of all samples of the epoch in proportion to their sizes.
    """
    if not 0.0 <= text_ratio < 1.0:
        raise ValueError(f"text_ratio must be in [0, 1), got {text_ratio}")
    main = [i for i, t in enumerate(text_groups) if not t]
    text = [i for i, t in enumerate(text_groups) if t]
    counts = [0] * len(totals)
    weighted = [i for i in main if weights[i] is not None]
    if weighted and len(weighted) != len(main):
        raise ValueError("give a weight to every shard group, or to none (natural ratios)")
    base = samples_per_epoch if samples_per_epoch is not None else sum(totals[i] for i in main)
    if weighted:
        norm = sum(float(weights[i]) for i in main)
        if norm <= 0:
            raise ValueError("group weights must sum to a positive number")
        for i in main:
            counts[i] = round(base * float(weights[i]) / norm)
    else:
        if samples_per_epoch is not None:
            scale = samples_per_epoch / max(1, sum(totals[i] for i in main))
            for i in main:
                counts[i] = round(totals[i] * scale)
        else:
            for i in main:
                counts[i] = totals[i]
    if text and text_ratio > 0:
        text_total = round(sum(counts[i] for i in main) * text_ratio / (1.0 - text_ratio))
        size = sum(totals[i] for i in text)
        if size == 0:
            raise ValueError("text shards hold no readable sample")
        for i in text:
            counts[i] = round(text_total * totals[i] / size)
    return counts


# ----------------------------------------------------------------------------------------------------------
# The dataset


class SkipSample(Exception):
    """Raised by an encoder for a sample that must be skipped; ``reason`` is its count key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _fresh_position(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "batches": 0, "nominal": 0, "owed": 0, "queue": []}


class ShardStream(IterableDataset):
    """Batches from shards following :class:`EpochPlanner`'s plan; resumable (``state_dict``).

    Args:
        planner: the epoch plan.
        encode: ``(key, members) -> sample`` (raises :class:`SkipSample`, ``SampleError`` or
            ``FrameDecodeError``, each counted by its ``reason``); a returned dict with ``"truncated": True``
            is counted as truncated.
        collate: a list of encoded samples -> a batch dict.
        rank, world_size: this process's place in the distributed job.
    """

    def __init__(
        self,
        planner: EpochPlanner,
        encode: Callable[[str, dict[str, bytes]], dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.planner = planner
        self.encode = encode
        self.collate = collate
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._position: dict[str, Any] = _fresh_position(0)  # where the running iterator stands
        self._num_workers = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_num_workers(self, num_workers: int) -> None:
        """The DataLoader's worker count (0 counts as 1), needed for ``len``."""
        self._num_workers = max(1, int(num_workers))

    def __len__(self) -> int:
        """Batches per rank this epoch (the same on every rank). With a frame budget the count depends on the
        epoch's order, so no length is given (a ``TypeError``, as for any unsized iterable)."""
        if self.planner.config.max_frames_per_batch is not None:
            raise TypeError("the number of batches varies per epoch under a frame budget")
        return self.planner.batches_per_rank(self.epoch, self.world_size, self._num_workers)

    def state_dict(self) -> dict[str, Any]:
        """The running iterator's position: epoch, batches yielded, next planned batch to read, and the
        samples read but not yet yielded (by plan position, re-read on restore)."""
        return {k: (list(map(list, v)) if k == "queue" else v) for k, v in self._position.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume = {
            "epoch": int(state["epoch"]),
            "batches": int(state["batches"]),
            "nominal": int(state.get("nominal", state["batches"])),
            "owed": int(state.get("owed", 0)),
            "queue": [[list(map(int, positions)), int(k)] for positions, k in state.get("queue", [])],
        }
        self._position = dict(self._resume)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        position = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        self._resume = None
        plan = self.planner.worker_plan(epoch, self.rank, self.world_size, worker, num_workers)
        self._position = position or _fresh_position(epoch)
        return self._batches(plan, dict(self._position))

    def _batches(self, plan: SlotPlan, position: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Batches of the plan. A planned batch whose samples all fail still yields a batch: the previous
        good batch (if it has a sample to spare) or else the next one is split to cover it, so the batch count
        stays the plan's and no sample is repeated unless a worker has fewer good samples than batches.
        To decide, one good batch is held back until the next planned batch has been read."""
        epoch, nominal, owed = position["epoch"], position["nominal"], position["owed"]
        batches = position["batches"]
        queue_positions = [(list(positions), k) for positions, k in position["queue"]]
        carried = {pos for positions, _ in queue_positions for pos in positions}
        # On resume, samples of the batches already yielded are passed over without reading their data.
        done = (
            set(plan.order[: plan.bounds[nominal]]) - carried
            if nominal < len(plan.bounds)
            else set(plan.order)
        )
        samples = self._read(plan, needed=lambda pos: pos not in done)
        pending: dict[int, tuple[str, Any]] = {}  # read, not yet emitted: at most the shuffle buffer
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        if batches == 0 and plan.padded:
            counts["padded"] += plan.padded

        def fetch(pos: int) -> tuple[str, Any]:
            while pos not in pending:
                got, outcome = next(samples)
                if got not in done:
                    pending[got] = outcome
            return pending.pop(pos)

        # queue: [[(position, sample), ...], number of batches to make of them]
        queue: list[list[Any]] = []
        for positions, k in queue_positions:
            group = [(pos, value) for pos in positions for status, value in [fetch(pos)] if status == "ok"]
            queue.append([group, k])
        last: dict[str, Any] | None = None

        def emit() -> dict[str, Any]:
            nonlocal batches, last
            group = queue[0]
            samples_left, k = group
            take = math.ceil(len(samples_left) / k)
            part, group[0] = samples_left[:take], samples_left[take:]
            group[1] = k - 1
            if group[1] == 0:
                queue.pop(0)
            if not part:  # fewer good samples than batches: repeat one (counted)
                part = [(-1, last)]
                counts["padded"] += 1
            last = part[-1][1]
            batch = self.collate([sample for _, sample in part])
            batch[COUNTS_KEY] = dict(counts)
            batch[EXAMPLES_KEY] = dict(examples)
            counts.clear()
            examples.clear()
            batches += 1
            self._position = {
                "epoch": epoch,
                "batches": batches,
                "nominal": nominal,
                "owed": owed,
                "queue": [[[pos for pos, _ in g], n] for g, n in queue],
            }
            return batch

        while nominal < plan.num_batches:
            good = []
            for pos in plan.order[plan.bounds[nominal] : plan.bounds[nominal + 1]]:
                status, value = fetch(pos)
                if status == "ok":
                    good.append((pos, value))
                    if value.get("truncated"):
                        counts["truncated"] += 1
                else:
                    reason, message = value
                    counts[reason] += 1
                    examples.setdefault(reason, message)
            nominal += 1
            if not good:
                # Cover the failed batch by splitting the held good batch if it can give a sample, else by
                # splitting the next good batch.
                if queue and len(queue[-1][0]) > queue[-1][1]:
                    queue[-1][1] += 1
                else:
                    owed += 1
                continue
            queue.append([good, 1 + owed])
            owed = 0
            while len(queue) > 1:
                yield emit()
        if queue and owed:
            queue[-1][1] += owed  # no good batch followed: the last one covers the rest (repeats if needed)
            owed = 0
        while queue:
            yield emit()
        if owed:
            log.warning(
                "rank %d: a worker had no usable sample this epoch and yields %d batches fewer than "
                "planned (under DDP the ranks' batch counts now differ)",
                self.rank,
                owed,
            )

    def _read(self, plan: SlotPlan, needed: Callable[[int], bool]) -> Iterator[tuple[int, tuple[str, Any]]]:
        """Encoded samples (or skip reasons) by input position, in reading order.

        Inputs of different groups interleave, so each shard keeps its own open reader ("run": consecutive
        samples of one shard) and continues where it stopped."""
        runs: list[list[int]] = []  # positions of consecutive samples of one shard
        open_run: dict[tuple[int, int], int] = {}
        run_of: list[int] = []
        for pos, ref in enumerate(plan.inputs):
            r = open_run.get((ref.group, ref.shard))
            if r is None or plan.inputs[runs[r][-1]].index + 1 != ref.index:
                r = open_run[(ref.group, ref.shard)] = len(runs)
                runs.append([])
            runs[r].append(pos)
            run_of.append(r)
        readers: dict[int, Iterator[tuple[int, str, dict[str, bytes] | None]]] = {}
        failed: dict[int, str] = {}
        for pos, ref in enumerate(plan.inputs):
            r = run_of[pos]
            path = self.planner.groups[ref.group].shards[ref.shard]
            if r not in readers and r not in failed:
                first = plan.inputs[runs[r][0]].index
                by_index = {plan.inputs[p].index: p for p in runs[r]}

                def load(index: int, by_index: dict[int, int] = by_index) -> bool:
                    return needed(by_index[index])

                readers[r] = iter_tar_samples(path, first, first + len(runs[r]), load=load)
            if r in failed:
                yield pos, ("error", ("shard_error", failed[r]))
                continue
            try:
                index, key, members = next(readers[r])
            except (ShardReadError, StopIteration) as err:
                failed[r] = (
                    str(err) if isinstance(err, ShardReadError) else f"shard {path} has no sample {ref.index}"
                )
                readers.pop(r)
                yield pos, ("error", ("shard_error", failed[r]))
                continue
            if pos == runs[r][-1]:
                readers.pop(r).close()  # the run is complete: release the file
            if index != ref.index:
                raise RuntimeError(
                    f"internal reading error: expected sample {ref.index} of {path}, got {index}"
                )
            yield pos, (("skipped", None) if members is None else self._encode(key, members))

    def _encode(self, key: str, members: dict[str, bytes]) -> tuple[str, Any]:
        try:
            return "ok", self.encode(key, members)
        except (SkipSample, SampleError) as err:
            return "error", (err.reason, str(err))
        except Exception as err:
            # Decoders raise their own errors (FrameDecodeError carries a reason). Anything else is still one
            # sample's problem: it is counted and reported with its type, and training goes on.
            reason = getattr(err, "reason", None) or "unexpected_error"
            return "error", (reason, f"sample {key!r}: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------------------
# The loader


def _passthrough(batch: Any) -> Any:
    """Batches are collated inside the dataset (the plan decides their composition)."""
    return batch


class ShardLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` over a :class:`ShardStream` that knows the epoch and collects the skip counts.

    Args:
        dataset: the stream (batches are formed inside it, so ``batch_size`` is None here).
        num_workers: loader worker processes (each reads its own slot of every epoch).
        epoch_fn: returns the epoch to read when an iteration starts (a Trainer's ``current_epoch``); without
            it the loader counts its own iterations. The epoch is part of the loader's state.
        counts: a Counter the skip counts are added to (shared by a DataModule's loaders).
        finalize: applied to every batch in the main process (e.g. normalising uint8 frames).
        **kwargs: passed on to ``StatefulDataLoader`` (``pin_memory``, ``prefetch_factor``, ...).

    Workers are not persistent: each epoch's workers start from the dataset with that epoch set. They leave stop
    signals (SIGTERM, SIGINT, ...) to the main process (see :mod:`fovlm.data.workers`), so a stop sent to the
    whole process group ends in the main process's checkpoint, not in a dead worker.
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        counts: Counter[str] | None = None,
        finalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("persistent_workers", None)
        kwargs["worker_init_fn"] = WorkerInit(kwargs.get("worker_init_fn"))
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_passthrough,
            persistent_workers=False,
            **kwargs,
        )
        dataset.set_num_workers(num_workers)
        self.epoch_fn = epoch_fn
        self.counts: Counter[str] = counts if counts is not None else Counter()
        self.finalize = finalize
        self._warned: set[str] = set()
        self._next_epoch = 0
        self._restored_epoch: int | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.epoch_fn is not None:
            epoch = int(self.epoch_fn())
        elif self._restored_epoch is not None:
            epoch = self._restored_epoch
        else:
            epoch = self._next_epoch
        self._restored_epoch = None
        self._next_epoch = epoch + 1
        self.dataset.set_epoch(epoch)
        with stop_signals_blocked():  # workers forked now start with the stop signals blocked
            iterator = super().__iter__()
        return _CountingIterator(iterator, self)

    def state_dict(self) -> dict[str, Any]:
        """This loader's position on every rank (each rank reads its own share, and one rank writes the
        checkpoint): a collective under DDP, called by Lightning on all ranks when it saves."""
        state = super().state_dict()
        state["fovlm_epoch"] = self._next_epoch - 1 if self._next_epoch > 0 else 0
        return gather_by_rank(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints written before positions were kept per rank hold the one rank's state itself.
        own = pick_rank(state_dict, "data position") if is_gathered(state_dict) else state_dict
        state = dict(own)
        epoch = int(state.pop("fovlm_epoch", 0))
        # A state saved after the last batch of an epoch resumes with the next epoch.
        self._restored_epoch = epoch + 1 if state.get("_iterator_finished", False) else epoch
        super().load_state_dict(state)

    def _account(self, batch: dict[str, Any]) -> dict[str, Any]:
        counts = batch.pop(COUNTS_KEY, None) or {}
        examples = batch.pop(EXAMPLES_KEY, None) or {}
        self.counts.update({reason: n for reason, n in counts.items() if n})
        for reason, n in counts.items():
            if n and reason not in self._warned and reason != "truncated":
                self._warned.add(reason)
                log.warning(
                    "skipping samples (%s), e.g. %s; further ones are counted, not reported",
                    reason,
                    examples.get(reason, "(no message)"),
                )
        return self.finalize(batch) if self.finalize is not None else batch


class _CountingIterator:
    """Wraps the loader's iterator: moves each batch's counts into the loader's counter."""

    def __init__(self, iterator: Iterator[dict[str, Any]], loader: ShardLoader):
        self._iterator = iterator
        self._loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        return self._loader._account(next(self._iterator))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)
