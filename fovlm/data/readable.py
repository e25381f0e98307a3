"""Whether a shard set holds a sample that can be used, and the one-line error that says why not.

Bad samples are skipped and counted (the loaders go on), but a split none of whose samples can be read would
train or validate on nothing. :func:`find_readable` reads a split's samples in file order until one encodes
(normally the very first, so the check costs one sample), counting the failures by reason with the first few
keys; when none encodes, :class:`NoReadableSampleError` names the split, its shard patterns, the counts by
reason and those first failures, on one line. The same :class:`SkipRecord` describes a benchmark whose every
question was skipped (:mod:`fovlm.eval.benchmarks`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fovlm.data.shards import ShardInfo
from fovlm.data.tar_samples import ShardReadError, iter_tar_samples

MAX_EXAMPLES = 3
"""Failing samples (or shards) named in a message, in reading order."""


def format_counts(counts: Mapping[str, int]) -> str:
    """``"bad_image: 3, missing_text: 1"``: counts by reason, largest first (ties by name)."""
    items = sorted(((reason, n) for reason, n in counts.items() if n), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason}: {n}" for reason, n in items)


@dataclass
class SkipRecord:
    """Skipped samples: counts by reason and the first few, as ``(where, reason)`` (``shard.tar/key``, or
    ``shard.tar`` for a shard that cannot be read at all)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((where, reason))

    def describe(self) -> str:
        """``"bad_image: 3, missing_text: 1; first: a.tar/k0 (bad_image), ..."``; ``"no sample"`` if none."""
        if not self.counts:
            return "no sample"
        first = ", ".join(f"{where} ({reason})" for where, reason in self.examples)
        return f"{format_counts(self.counts)}; first: {first}"


def show_patterns(patterns: Sequence[str], most: int = 3) -> str:
    """Shard patterns for a message: the first ``most``, quoted, and how many more."""
    shown = ", ".join(repr(str(p)) for p in patterns[:most])
    return shown + (f" and {len(patterns) - most} more" if len(patterns) > most else "")


class NoReadableSampleError(ValueError):
    """A split (``train``, ``text``, ``val``) whose shards hold no sample the loader can use.

    Attributes:
        split: the split, or a group of it (``train group 'openvid'``).
        argument: the DataModule argument naming the shards (``train_shards``, ``text_shards`` or
            ``val_shards``).
        record: what was skipped, by reason, with the first failures.
    """

    def __init__(self, split: str, argument: str, patterns: Sequence[str], files: int, record: SkipRecord):
        self.split = split
        self.argument = argument
        self.patterns = list(patterns)
        self.record = record
        noun = "file" if files == 1 else "files"
        super().__init__(
            f"no readable sample in the {split} shards ({show_patterns(self.patterns)}: {files} {noun}); "
            f"skipped {record.describe()}"
        )


def find_readable(
    paths: Sequence[str], index: Mapping[str, ShardInfo], encode: Callable[[str, dict[str, bytes]], Any]
) -> SkipRecord | None:
    """None as soon as a sample of ``paths`` encodes, else what was skipped (every sample, by reason).

    Args:
        paths: the shards, read in this order.
        index: their index (:func:`fovlm.data.shards.build_index`): a shard without samples is not opened.
        encode: the loader's encoder, ``(key, members) -> sample``; any exception skips the sample, counted by
            its ``reason`` (``SkipSample``, ``SampleError``, ``FrameDecodeError``) or as ``unexpected_error``.
    """
    record = SkipRecord()
    for path in paths:
        name = Path(path).name
        info = index.get(path)
        if info is not None and info.num_samples == 0:
            record.add("damaged_shard" if info.error else "empty_shard", name)
            continue
        samples = iter_tar_samples(path)
        try:
            for _, key, members in samples:
                try:
                    encode(key, members or {})
                except Exception as err:  # this sample's failure: counted by reason, as the loader does
                    record.add(getattr(err, "reason", None) or "unexpected_error", f"{name}/{key}")
                    continue
                return None
        except ShardReadError:
            record.add("damaged_shard", name)
        finally:
            samples.close()
    return record
