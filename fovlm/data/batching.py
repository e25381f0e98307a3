"""Batch assembly: one worker's planned batches become collated batches, whatever samples fail to read.

Bad data never stops training: an undecodable sample is skipped and counted by reason. A planned batch whose
samples all fail still yields a batch: the previous good batch (if it has a sample to spare) or else the next
one is split to cover it, so the batch count stays the plan's and no sample is repeated unless a worker has
fewer good samples than batches. To decide, one good batch is held back until the next planned batch has been
read. Counts travel with the batches (:data:`COUNTS_KEY`, :data:`EXAMPLES_KEY`) to the main process, where the
loader removes them from the batch and adds them up.

Where an assembly stands is its *position*, a plain dict that a checkpoint stores: ``epoch``, ``batches``
(batches yielded), ``nominal`` (the next planned batch to read), ``owed`` (failed planned batches not yet
covered) and ``queue`` (the samples read but held back, by plan position, each group with the number of
batches still to be made of it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fovlm.data.plan import SlotPlan

COUNTS_KEY = "_counts"
"""Batch key carrying ``{reason: count}`` of the samples skipped (or padded / truncated) in that batch."""
EXAMPLES_KEY = "_count_examples"
"""Batch key carrying one example message per reason."""

Outcome = tuple[str, Any]
"""What reading a sample gave: ``("ok", sample)``, ``("error", (reason, message))`` or ``("skipped", None)``
(its data was not needed)."""


def start_position(epoch: int) -> dict[str, Any]:
    """The position at the start of ``epoch``: nothing yielded, read or held."""
    return {"epoch": epoch, "batches": 0, "nominal": 0, "owed": 0, "queue": []}


@dataclass
class HeldBatch:
    """Good samples of one or more planned batches, and how many batches are still to be made of them."""

    samples: list[tuple[int, Any]]  # (plan position, encoded sample)
    splits: int


class BatchAssembly:
    """The batches of one worker's plan for one epoch, from a position on (module docstring).

    Args:
        plan: the worker's plan.
        position: where to start (a position as :func:`start_position` makes, or as a checkpoint restored it).
        read: ``needed -> iterator of (plan position, outcome)`` in reading order; the data of a sample is
            read only where ``needed(position)`` is true. On resume the batches already yielded are passed
            over without reading their data.
        collate: a list of encoded samples -> a batch dict.

    Iterating yields the batches; :attr:`position` is where the assembly stands after the last one, and
    :attr:`owed` the planned batches that could not be covered once it is exhausted.
    """

    def __init__(
        self,
        plan: SlotPlan,
        position: dict[str, Any],
        read: Callable[[Callable[[int], bool]], Iterator[tuple[int, Outcome]]],
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    ):
        self.plan = plan
        self.collate = collate
        self.position = position
        self.epoch: int = position["epoch"]
        self.batches: int = position["batches"]
        self.nominal: int = position["nominal"]
        self.owed: int = position["owed"]
        self._restore = [(list(positions), k) for positions, k in position["queue"]]
        carried = {pos for positions, _ in self._restore for pos in positions}
        self._done = (
            set(plan.order[: plan.bounds[self.nominal]]) - carried
            if self.nominal < len(plan.bounds)
            else set(plan.order)
        )
        self._samples = read(lambda pos: pos not in self._done)
        self._pending: dict[int, Outcome] = {}  # read, not yet emitted: at most the shuffle buffer
        self._queue: list[HeldBatch] = []
        self._last: Any = None  # the last sample emitted (repeated when a worker runs out of samples)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        if self.batches == 0 and plan.padded:
            self.counts["padded"] += plan.padded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for positions, k in self._restore:
            fetched = [(pos, self._fetch(pos)) for pos in positions]
            self._queue.append(
                HeldBatch([(pos, value) for pos, (status, value) in fetched if status == "ok"], k)
            )
        while self.nominal < self.plan.num_batches:
            good = self._read_planned_batch()
            if not good:
                self._cover_failed_batch()
                continue
            self._queue.append(HeldBatch(good, 1 + self.owed))
            self.owed = 0
            while len(self._queue) > 1:
                yield self._emit()
        if self._queue and self.owed:
            # No good batch followed: the last one covers the rest (repeats if needed).
            self._queue[-1].splits += self.owed
            self.owed = 0
        while self._queue:
            yield self._emit()

    def _fetch(self, pos: int) -> Outcome:
        while pos not in self._pending:
            got, outcome = next(self._samples)
            if got not in self._done:
                self._pending[got] = outcome
        return self._pending.pop(pos)

    def _read_planned_batch(self) -> list[tuple[int, Any]]:
        """The good samples of the next planned batch; the others are counted by reason."""
        plan, good = self.plan, []
        for pos in plan.order[plan.bounds[self.nominal] : plan.bounds[self.nominal + 1]]:
            status, value = self._fetch(pos)
            if status == "ok":
                good.append((pos, value))
                if value.get("truncated"):
                    self.counts["truncated"] += 1
            else:
                reason, message = value
                self.counts[reason] += 1
                self.examples.setdefault(reason, message)
        self.nominal += 1
        return good

    def _cover_failed_batch(self) -> None:
        """Cover a planned batch whose samples all failed by splitting the held good batch if it can give a
        sample, else by splitting the next good batch."""
        if self._queue and len(self._queue[-1].samples) > self._queue[-1].splits:
            self._queue[-1].splits += 1
        else:
            self.owed += 1

    def _emit(self) -> dict[str, Any]:
        held = self._queue[0]
        take = math.ceil(len(held.samples) / held.splits)
        part, held.samples = held.samples[:take], held.samples[take:]
        held.splits -= 1
        if held.splits == 0:
            self._queue.pop(0)
        if not part:  # fewer good samples than batches: repeat one (counted)
            part = [(-1, self._last)]
            self.counts["padded"] += 1
        self._last = part[-1][1]
        batch = self.collate([sample for _, sample in part])
        batch[COUNTS_KEY] = dict(self.counts)
        batch[EXAMPLES_KEY] = dict(self.examples)
        self.counts.clear()
        self.examples.clear()
        self.batches += 1
        self.position = {
            "epoch": self.epoch,
            "batches": self.batches,
            "nominal": self.nominal,
            "owed": self.owed,
            "queue": [[[pos for pos, _ in h.samples], h.splits] for h in self._queue],
        }
        return batch
