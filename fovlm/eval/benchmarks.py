"""Benchmark adapters: multiple-choice shards -> :class:`fovlm.eval.questions.Question` records.

Every benchmark (MVBench, Video-MME, MLVU, ScienceQA-style image questions, the synthetic demo split) is
converted by ``data_prep`` into shards of the one format (docs/shards.md#native-json-fields) whose JSON carries
``question``, ``options``, ``answer`` and optionally ``category``. This module reads such shards in order
(no shuffling: results must be reproducible), validates each sample with :mod:`fovlm.data.schema`, decodes
its frames with :mod:`fovlm.data.frames` (1 FPS, at most 64 spread uniformly; single images replicated to
``image_frames``) and yields one question per sample.

A sample that is not a valid multiple-choice sample, or whose frames cannot be decoded, is skipped and
counted per reason (:attr:`BenchmarkReader.skipped`): a score over fewer questions is reported as such,
never hidden. A benchmark whose shards give no question at all is an error (:class:`EmptyBenchmarkError`, raised
when its reading ends) that names it, its shards and the skipped samples by reason, never an empty score.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from fovlm.data.contract import FRAME_SETTINGS
from fovlm.data.frames import FrameDecodeError, sample_frames, select_frame_indices
from fovlm.data.readable import SkipRecord, show_patterns
from fovlm.data.schema import SampleError, parse_sample
from fovlm.data.shards import ShardReadError, expand_shards, iter_tar_samples
from fovlm.eval.questions import Question

log = logging.getLogger(__name__)


class EmptyBenchmarkError(ValueError):
    """A benchmark whose shards give no question: every sample was skipped (or there is none).

    Attributes:
        name: the benchmark.
        shards: its shard patterns as given.
        record: the skipped samples by reason, with the first few.
    """

    def __init__(self, name: str, shards: str | Sequence[str], record: SkipRecord):
        self.name = name
        self.shards = [str(shards)] if isinstance(shards, str | Path) else [str(p) for p in shards]
        self.record = record
        what = f"every sample was skipped: {record.describe()}" if record.counts else "its shards hold no sample"
        super().__init__(f"benchmark {name!r} ({show_patterns(self.shards)}) has no question to score: {what}")


class BenchmarkReader:
    """Iterates the questions of one benchmark's shards.

    Args:
        name: benchmark name (results are filed under it).
        shards: glob or brace pattern (``data/mvbench/*.tar``), a folder of ``*.tar``, or a list of them.
        image_frames: frames an image question is replicated to.
        max_frames: most frames per video (spread uniformly beyond).
        frame_size: square frame side in pixels.
        limit: stop after this many questions (None: all).

    Iterating raises :class:`EmptyBenchmarkError` when the shards give no question (and ``limit`` is not 0).
    """

    def __init__(
        self,
        name: str,
        shards: str | Sequence[str],
        image_frames: int = FRAME_SETTINGS.image_frames,
        max_frames: int = FRAME_SETTINGS.max_frames,
        frame_size: int = FRAME_SETTINGS.frame_size,
        limit: int | None = None,
    ) -> None:
        self.name = name
        self.shards = shards
        self.image_frames = image_frames
        self.max_frames = max_frames
        self.frame_size = frame_size
        self.limit = limit
        self.record = SkipRecord()

    @property
    def skipped(self) -> Counter[str]:
        """Samples skipped so far, by reason."""
        return self.record.counts

    def __iter__(self) -> Iterator[Question]:
        count, self.record = 0, SkipRecord()  # each reading counts its own skips
        for path in expand_shards(_folder_to_glob(self.shards)):
            try:
                for _, key, members in iter_tar_samples(path):
                    if self.limit is not None and count >= self.limit:
                        return
                    question = self._question(path, key, members)
                    if question is not None:
                        count += 1
                        yield question
            except ShardReadError as err:
                self._skip("bad_shard", path, "-", str(err))
        if count == 0 and self.limit != 0:
            raise EmptyBenchmarkError(self.name, self.shards, self.record)

    def _question(self, path: str, key: str, members: dict[str, bytes]) -> Question | None:
        if "json" not in members:
            self._skip("missing_json", path, key, "no KEY.json member")
            return None
        try:
            sample = parse_sample(members["json"], key.rsplit("/", 1)[-1], members.keys(), members.get("txt"))
        except SampleError as err:
            self._skip(err.reason, path, key, str(err))
            return None
        if sample.choice is None:
            self._skip("not_multiple_choice", path, key, "no question/options/answer")
            return None
        if sample.media == "text":
            self._skip("no_frames", path, key, "a text-only question")
            return None
        try:
            frames = sample_frames(members, sample.media, size=self.frame_size, max_frames=self.max_frames,
                                   image_frames=self.image_frames)
        except FrameDecodeError as err:
            self._skip(err.reason, path, key, str(err))
            return None
        choice = sample.choice
        return Question(
            key=key, benchmark=self.name, question=choice.question, options=choice.options, answer=choice.answer,
            category=choice.category, frames=frames, media=sample.media,
            times=_frame_times(members, sample.media, frames.shape[0], self.max_frames, sample.duration),
            answer_region=sample.answer_region,
        )

    def _skip(self, reason: str, path: str, key: str, detail: str) -> None:
        self.record.add(reason, Path(path).name if key == "-" else f"{Path(path).name}/{key}")
        log.warning("%s: skipping sample %r of %s (%s): %s", self.name, key, Path(path).name, reason, detail)


def _folder_to_glob(shards: str | Sequence[str]) -> list[str]:
    """Shard patterns with each folder replaced by the glob of its ``*.tar`` files."""
    patterns = [shards] if isinstance(shards, str | Path) else list(shards)
    return [str(Path(p) / "*.tar") if Path(p).is_dir() else str(p) for p in patterns]


def _frame_times(
    members: dict[str, bytes], media: str, count: int, max_frames: int, duration: float | None
) -> tuple[float, ...] | None:
    """Timestamps (s) of the kept frames where the sample tells them, else None.

    Numbered frames were sampled at 1 FPS, frame i at i + 0.5 s; an mp4's frames follow
    :func:`fovlm.data.frames.select_frame_times` over its ``duration``."""
    from fovlm.data.frames import select_frame_times
    from fovlm.data.schema import frame_fields

    if media != "video":
        return None
    if "mp4" in members:
        times = select_frame_times(duration, FRAME_SETTINGS.fps, max_frames) if duration else []
        return tuple(times) if len(times) == count else None
    numbered = frame_fields(list(members))
    times = [i + 0.5 for i in select_frame_indices(len(numbered), max_frames)]
    return tuple(times) if len(times) == count else None
