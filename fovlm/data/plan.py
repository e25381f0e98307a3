"""The epoch plan: which samples every worker of every rank reads in an epoch, in which order and batches.

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
   in part; a local tar is entered at a sample by skipping member headers without reading their data).
   A group holding streamed shards (``pipe:`` commands, URLs: a stream cannot be entered mid-way) is cut at
   *shard* boundaries instead, each cut moved to the nearest shard boundary, so that every shard of the epoch
   is read by one slot alone, provided no slot's share then differs from the even share by more than
   ``shard_split_tolerance`` (10 %); otherwise (few or very uneven shards) it is cut at sample granularity as
   above, and a slot that starts inside a streamed shard reads it from its beginning, passing over the samples
   before its own. Either way every sample belongs to exactly one slot.
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

The plan knows every sample's frame count before any is read (from the shard index,
:mod:`fovlm.data.shards`), so a frame budget per batch is planned, not discovered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fovlm.data.contract import FRAME_SETTINGS, FrameSettings
from fovlm.data.shards import ShardInfo, is_streamed, planned_frames


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
    """Everything (besides the index) that decides an epoch's plan.

    Args:
        batch_size: samples per batch.
        seed: seeds the shard order of every pass, the mixing of groups and the shuffle buffer.
        shuffle: shuffle shards, mix groups at random and run the shuffle buffer (else: file order).
        shuffle_buffer: samples the simulated shuffle buffer holds.
        max_frames_per_batch: optional frame budget per batch.
        frames: the frame settings that turn the index's frame codes into frame counts.
        shard_split_tolerance: a group of streamed shards is split at shard boundaries when no slot's share
            then differs from the even share by more than this fraction of it (else at sample granularity).
    """

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    max_frames_per_batch: int | None = None
    frames: FrameSettings = FRAME_SETTINGS
    shard_split_tolerance: float = 0.1


class EpochPlanner:
    """Computes the per-epoch plan of :mod:`this module's docstring <fovlm.data.plan>` from an index."""

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
        self.streamed = [any(is_streamed(p) for p in g.shards) for g in self.groups]
        # Shard-boundary cuts of streamed groups, by (group, epoch, slots).
        self._cuts: dict[tuple[int, int, int], list[int] | None] = {}
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

    def _shard_bounds(self, group: int, lo: int, hi: int) -> np.ndarray:
        """Positions (relative to ``lo``) where a shard starts or ends in ``lo <= position < hi`` of a group's
        stream, ``0`` and ``hi - lo`` included."""
        total, bounds, position = self.totals[group], [np.zeros(1, dtype=np.int64)], lo
        while position < hi:
            pass_index = position // total
            ends = pass_index * total + np.cumsum(self.sizes[group][self._pass_order(group, pass_index)])
            bounds.append(ends[(ends > position) & (ends < hi)] - lo)
            position = (pass_index + 1) * total
        bounds.append(np.asarray([hi - lo], dtype=np.int64))
        return np.unique(np.concatenate(bounds))

    def _shard_cuts(self, group: int, epoch: int, slots: int) -> list[int] | None:
        """Slot boundaries of a streamed group's epoch range moved to the nearest shard boundaries, or None when
        a slot's share would then differ from the even share by more than the tolerance."""
        cached = (group, epoch, slots)
        if cached not in self._cuts:
            count = self.counts[group]
            bounds = self._shard_bounds(group, epoch * count, (epoch + 1) * count)
            even = [count * s // slots for s in range(slots + 1)]
            cuts = [0]
            for target in even[1:-1]:
                k = int(np.searchsorted(bounds, target))
                near = [int(b) for b in bounds[max(0, k - 1) : k + 1]]
                cuts.append(max(cuts[-1], min(near, key=lambda b: (abs(b - target), b))))
            cuts.append(count)
            tolerance = self.config.shard_split_tolerance
            balanced = all(
                abs((cuts[s + 1] - cuts[s]) - (even[s + 1] - even[s])) <= tolerance * (even[s + 1] - even[s])
                for s in range(slots)
            )
            self._cuts[cached] = cuts if balanced else None
        return self._cuts[cached]

    def group_range(self, group: int, epoch: int, slot: int, slots: int) -> tuple[int, int]:
        """The positions ``lo <= position < hi`` of a group's stream that a slot reads this epoch: at shard
        boundaries for a streamed group where they are balanced enough, else at sample granularity."""
        count = self.counts[group]
        cuts = self._shard_cuts(group, epoch, slots) if self.streamed[group] else None
        lo, hi = (cuts[slot], cuts[slot + 1]) if cuts is not None else self._cut(count, slots, slot)
        return epoch * count + lo, epoch * count + hi

    def slot_inputs(self, epoch: int, slot: int, slots: int) -> list[Ref]:
        """The samples a slot reads this epoch, groups interleaved at sample level (seeded)."""
        pieces = [
            self._stream_refs(g, *self.group_range(g, epoch, slot, slots)) for g in range(len(self.counts))
        ]
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
        return planned_frames(int(self.codes[ref.group][ref.shard][ref.index]), self.config.frames)

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
        n = sum(hi - lo for lo, hi in (self.group_range(g, epoch, slot, slots) for g in range(len(self.counts))))
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
