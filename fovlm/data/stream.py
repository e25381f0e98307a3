"""The stateful stream of batches and its loader: what a loader worker reads in an epoch, resumable exactly.

A :class:`ShardStream` is an ``IterableDataset``: each loader worker computes its own plan for the epoch
(:mod:`fovlm.data.plan`), reads its samples from the shards, local or streamed (:mod:`fovlm.data.tar_samples`),
encodes them and yields the planned batches (:mod:`fovlm.data.batching`).

**Resume.** A worker's state is its epoch, the batches it yielded, the next planned batch and the samples
read but held back (by plan position): with the plan, an exact place in every shard (shard and sample
offset). Restoring replays the plan, passes over the batches already yielded without reading their data (a
shard all of whose samples were yielded is not opened; a local tar seeks over the samples before the resume
point, a streamed one reads forward past them), re-reads the held samples and continues with the next batch.
torchdata's ``StatefulDataLoader`` collects these states from the workers; Lightning stores a stateful
loader's state in checkpoints and restores it before iterating. The epoch comes from the Trainer
(``epoch_fn``), or the loader counts its iterations.

Bad data never stops training: a sample that cannot be encoded is skipped and counted by reason, a shard that
is unreadable or truncated keeps its readable samples and is reported. The counts travel with the batches to
the main process, where :class:`ShardLoader` removes them from the batch, adds them up and warns once per
reason.
"""

from __future__ import annotations

import copy

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from fovlm.data.batching import COUNTS_KEY, EXAMPLES_KEY, BatchAssembly, Outcome, start_position
from fovlm.data.plan import EpochPlanner, SlotPlan
from fovlm.data.schema import SampleError
from fovlm.data.tar_samples import ShardReadError, iter_tar_samples
from fovlm.data.workers import WorkerInit, stop_signals_blocked
from fovlm.rank_state import gather_by_rank, is_gathered, pick_rank

log = logging.getLogger(__name__)


class SkipSample(Exception):
    """Raised by an encoder for a sample that must be skipped; ``reason`` is its count key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
        self._position: dict[str, Any] = start_position(0)  # where the running iterator stands
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
        self._position = position or start_position(epoch)
        return self._batches(plan, dict(self._position))

    def _batches(self, plan: SlotPlan, position: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Batches of the plan from ``position`` on (:class:`~fovlm.data.batching.BatchAssembly`); the stream's
        position follows every batch."""
        assembly = BatchAssembly(plan, position, partial(self._read, plan), self.collate)
        for batch in assembly:
            self._position = assembly.position
            yield batch
        if assembly.owed:
            log.warning(
                "rank %d: a worker had no usable sample this epoch and yields %d batches fewer than "
                "planned (under DDP the ranks' batch counts now differ)",
                self.rank,
                assembly.owed,
            )

    def _read(self, plan: SlotPlan, needed: Callable[[int], bool]) -> Iterator[tuple[int, Outcome]]:
        """Encoded samples (or skip reasons) by input position, in reading order.

        Inputs of different groups interleave, so each shard keeps its own open reader ("run": consecutive
        samples of one shard) and continues where it stopped. A run none of whose samples is needed (all
        yielded before a resume) is not opened: a streamed shard is then not downloaded again."""
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
        wanted = [any(needed(pos) for pos in run) for run in runs]
        readers: dict[int, Iterator[tuple[int, str, dict[str, bytes] | None]]] = {}
        failed: dict[int, str] = {}
        for pos, ref in enumerate(plan.inputs):
            r = run_of[pos]
            if not wanted[r]:
                yield pos, ("skipped", None)
                continue
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
                    str(err)
                    if isinstance(err, ShardReadError)
                    else f"shard {path} has no sample {ref.index} (it ends before the samples its index counts)"
                )
                readers.pop(r)
                yield pos, ("error", ("shard_error", failed[r]))
                continue
            if pos == runs[r][-1]:
                readers.pop(r).close()  # the run is complete: release the file (or stop the stream)
            if index != ref.index:
                raise RuntimeError(
                    f"internal reading error: expected sample {ref.index} of {path}, got {index}"
                )
            yield pos, (("skipped", None) if members is None else self._encode(key, members))

    def _encode(self, key: str, members: dict[str, bytes]) -> Outcome:
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
        counts: a Counter the skip counts are added to (shared by a DataModule's loaders); the counts of the
            current (or last) iteration alone are ``iteration_counts``.
        finalize: applied to every batch in the main process (e.g. normalising uint8 frames).
        **kwargs: passed on to ``StatefulDataLoader`` (``pin_memory``, ``prefetch_factor``, ...).

    The position it saves is that of the batches training has taken. A sized loader's batches are taken as they
    are read; an unsized one (a frame budget makes the batch count vary per epoch) is read one batch ahead by
    Lightning, to know which batch ends the epoch, so its saved position is the one before the batch read ahead
    (until the epoch's end is reached: then nothing was read ahead).

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
        self.iteration_counts: Counter[str] = Counter()
        self.finalize = finalize
        self._warned: set[str] = set()
        self._next_epoch = 0
        self._restored_epoch: int | None = None
        # The position before the batch read last, and whether the iteration has ended (see the class docstring).
        self._before_last: dict[str, Any] | None = None
        self._exhausted = False
        self._reads_ahead = False

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
        self.iteration_counts = Counter()
        self._before_last, self._exhausted = None, False
        self._reads_ahead = self.read_ahead
        return _CountingIterator(iterator, self)

    @property
    def read_ahead(self) -> bool:
        """Whether Lightning reads this loader one batch ahead: it has no length."""
        try:
            len(self.dataset)
        except TypeError:
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """This loader's position on every rank (each rank reads its own share, and one rank writes the
        checkpoint): a collective under DDP, called by Lightning on all ranks when it saves."""
        ahead = self._reads_ahead and self._before_last is not None and not self._exhausted
        state = copy.deepcopy(self._before_last) if ahead else super().state_dict()
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
        counted = {reason: n for reason, n in counts.items() if n}
        self.counts.update(counted)
        self.iteration_counts.update(counted)
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
    """Wraps the loader's iterator: moves each batch's counts into the loader's counter, and for a loader read
    ahead keeps the position before each batch."""

    def __init__(self, iterator: Iterator[dict[str, Any]], loader: ShardLoader):
        self._iterator = iterator
        self._loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        loader = self._loader
        before = copy.deepcopy(StatefulDataLoader.state_dict(loader)) if loader._reads_ahead else None
        try:
            batch = next(self._iterator)
        except StopIteration:
            loader._exhausted = True
            raise
        loader._before_last = before
        return loader._account(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)
