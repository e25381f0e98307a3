"""Benchmark adapters: multiple-choice shards -> :class:`fovlm.eval.questions.Question` records.

Every benchmark (MVBench, Video-MME, MLVU, ScienceQA-style image questions, the synthetic demo split) is
converted by ``data_prep`` into shards of the one format (docs/shards.md#native-json-fields) whose JSON carries
``question``, ``options``, ``answer`` and optionally ``category``. This module reads such shards in order
(no shuffling: results must be reproducible), validates each sample with :mod:`fovlm.data.schema`, decodes
its frames with :mod:`fovlm.data.frames` (1 FPS, at most ``max_frames`` spread uniformly; single images
replicated to ``image_frames``) and yields one question per sample. With ``stream_above`` a video that gives more
frames than that is not decoded up front: its question holds a :class:`fovlm.data.frame_stream.SampleFrames`
that decodes the same frames one at a time from the compressed members while the scorer reads them
(:mod:`fovlm.eval.stream_scoring`).

A sample that is not a valid multiple-choice sample, or whose frames cannot be decoded, is skipped and
counted per reason (:attr:`BenchmarkReader.skipped`): a score over fewer questions is reported as such,
never hidden. A streamed video whose decoding fails part-way is skipped the same way when the failure comes
(the scorer drops that question). A benchmark whose shards give no question at all is an error (:class:`EmptyBenchmarkError`, raised
when its reading ends) that names it, its shards and the skipped samples by reason, never an empty score.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import Tensor

from fovlm.data.contract import FRAME_SETTINGS
from fovlm.data.frame_stream import SampleFrames, sample_video_frames
from fovlm.data.frames import FrameDecodeError, sample_frames
from fovlm.data.readable import SkipRecord, show_patterns
from fovlm.data.regions import frame_times
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
        stream_above: a video that gives more frames than this is read one frame at a time as it is scored
            (``Question.frames`` a :class:`fovlm.data.frame_stream.SampleFrames`); None: every sample's frames
            are decoded up front.

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
        stream_above: int | None = None,
    ) -> None:
        if stream_above is not None and stream_above < 0:
            raise ValueError(f"stream_above must be None or >= 0, got {stream_above}")
        self.name = name
        self.shards = shards
        self.image_frames = image_frames
        self.max_frames = max_frames
        self.frame_size = frame_size
        self.limit = limit
        self.stream_above = stream_above
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
                        if question.streamed and question.frames.error is not None:
                            count -= 1  # its stream failed while it was scored: a skipped sample
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
            frames = self._frames(path, key, members, sample.media)
        except FrameDecodeError as err:
            self._skip(err.reason, path, key, str(err))
            return None
        choice = sample.choice
        return Question(
            key=key, benchmark=self.name, question=choice.question, options=choice.options, answer=choice.answer,
            category=choice.category, frames=frames, media=sample.media,
            times=frame_times(members, sample.media, len(frames), self.max_frames, sample.duration),
            answer_region=sample.answer_region,
        )

    def _frames(self, path: str, key: str, members: dict[str, bytes], media: str) -> Tensor | SampleFrames:
        """The sample's frames: uint8 [T, 3, H, W], or read lazily when a video gives more than ``stream_above``."""
        if self.stream_above is not None and media == "video" and self.max_frames > self.stream_above:
            lazy = sample_video_frames(members, self.frame_size, self.max_frames)
            if lazy is not None and len(lazy) > self.stream_above:
                lazy.on_error = lambda err: self._skip(err.reason, path, key, str(err))
                return lazy
        return sample_frames(members, media, size=self.frame_size, max_frames=self.max_frames,
                             image_frames=self.image_frames)

    def _skip(self, reason: str, path: str, key: str, detail: str) -> None:
        self.record.add(reason, Path(path).name if key == "-" else f"{Path(path).name}/{key}")
        log.warning("%s: skipping sample %r of %s (%s): %s", self.name, key, Path(path).name, reason, detail)


def _folder_to_glob(shards: str | Sequence[str]) -> list[str]:
    """Shard patterns with each folder replaced by the glob of its ``*.tar`` files."""
    patterns = [shards] if isinstance(shards, str | Path) else list(shards)
    return [str(Path(p) / "*.tar") if Path(p).is_dir() else str(p) for p in patterns]
