"""Run evaluations: benchmarks in the three modes, validation loss per source and mode, baselines; ``fovlm eval``.

    fovlm eval --model exported/fovlm-135m --benchmark mvbench=data/mvbench --benchmark demo=data/demo/mcq \
        [--modes coarse_only coarse_fine autoregressive] [--limit 200] [--out results.json] \
        [--tensorboard runs/eval] [--baseline HuggingFaceTB/SmolVLM2-256M-Video-Instruct] \
        [--val data/synthetic/sft/val/*.tar] [--max-frames 1000 --stream-above 64] [--quiet]

``fovlm eval`` is a command of its own rather than ``fovlm test --config``: a benchmark question is scored by
several forward passes that share a patch pass and KV caches (:func:`fovlm.eval.scoring.score_question`), which
does not fit a per-batch ``test_step``; and evaluation must run on an exported folder without Lightning. A video
that gives more than ``--stream-above`` frames (64 by default, the default ``--max-frames``: so only a raised cap
streams) is decoded one frame at a time and scored in one streamed pass
(:func:`fovlm.eval.stream_scoring.score_stream`: the same scores, one frame and its patch pass held at a time);
shorter clips are decoded up front and scored in one batch. Results
go to a JSON file, a printed table and TensorBoard (``eval/<benchmark>/<mode>/accuracy``). Skipped samples are
counted per benchmark and reported; a benchmark (or ``--val`` set) none of whose samples can be used is a
one-line error naming it, its shards and the skips by reason, with exit code 2 as for bad options. On a terminal,
progress bars on stderr show the questions (and ``--val`` batches) done, their rate and the time left; ``--quiet``
turns them off.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from fovlm.data.frames import FrameDecodeError, normalize
from fovlm.data.readable import NoReadableSampleError
from fovlm.data.shards import build_index, expand_shards
from fovlm.eval.benchmarks import BenchmarkReader, EmptyBenchmarkError
from fovlm.eval.looking import attention_shares, region_share, save_region_sheet
from fovlm.eval.questions import ANSWER_FORMATS, OptionTokens, Question, render_options
from fovlm.eval.report import MultipleChoiceReport
from fovlm.eval.scoring import question_length, score_question
from fovlm.eval.stream_scoring import StreamTooLong, score_stream
from fovlm.losses import AnswerOnlyCE
from fovlm.model.checkpoint import CheckpointError
from fovlm.model.pretrained import load_any, use_queries
from fovlm.model.vlm import MODES

log = logging.getLogger(__name__)


def progress_bar(
    items: Iterable, desc: str, unit: str, count: Callable[[Iterable], int | None] | None = None,
    progress: bool | None = None,
) -> Iterable:
    """``items`` under a tqdm bar on stderr: done, rate and, with a total, the time left. ``progress`` True shows
    it, False hides it, None shows it on a terminal only. ``count(items)`` gives the total, asked for only when the
    bar shows (default: ``len(items)`` if there is one)."""
    from tqdm import tqdm

    if not (sys.stderr.isatty() if progress is None else progress):
        return items
    try:
        total = count(items) if count is not None else len(items)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, dynamic_ncols=True)


class AboveBars(logging.Handler):
    """A logging handler that prints on stderr above the progress bars (``tqdm.write``), not through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler: a failing handler must not stop the evaluation
            self.handleError(record)


def planned_questions(questions: Iterable[Question]) -> int | None:
    """At most how many questions a benchmark gives: its shards' samples (from the cached shard index), capped at
    its ``limit``; samples that are skipped make the bar end short of it. None when that cannot be told."""
    if not isinstance(questions, BenchmarkReader):
        return len(questions) if hasattr(questions, "__len__") else None  # type: ignore[arg-type]
    patterns = [questions.shards] if isinstance(questions.shards, str | Path) else list(questions.shards)
    try:
        paths = expand_shards([str(Path(p) / "*.tar") if Path(p).is_dir() else str(p) for p in patterns])
        if not all(Path(path).is_file() for path in paths):  # streamed shards are not read twice
            return None
        samples = sum(info.num_samples for info in build_index(paths).values())
    except (OSError, ValueError):  # the reader reports bad patterns itself
        return None
    return samples if questions.limit is None else min(samples, questions.limit)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    benchmarks: Mapping[str, Iterable[Question]],
    modes: tuple[str, ...] = MODES,
    report: MultipleChoiceReport | None = None,
    answer_format: str = "letter",
    attention_dir: str | None = None,
    attention_examples: int = 0,
    progress: bool | None = None,
) -> MultipleChoiceReport:
    """Score every question of every benchmark in ``modes``; returns the (updated) report. Questions that say
    where their answer is shown also get each mode's attention share inside that region.

    A question whose frames are held as one stack is scored in one batch (:func:`score_question`); one whose
    frames are read one at a time (a long video, :attr:`Question.streamed`) in one streamed pass
    (:func:`score_stream`), its shares from the same pass; a stream whose decoding fails part-way drops its
    question (its reader counts the skip). Attention sheets are drawn for the first questions with a one-box region
    that are not streamed.

    Args:
        model: FoveatedVLM (put in eval mode here).
        tokenizer: its tokenizer.
        benchmarks: benchmark name -> questions (e.g. :class:`fovlm.eval.benchmarks.BenchmarkReader`).
        modes: the modes to score.
        report: a report to add to (a new one by default).
        answer_format: "letter" ("B. option", the fVLM original's protocol), "text" (the option text alone) or
            "cloze" (the question without its options, each option text scored as the answer).
        attention_dir: where to save attention sheets of the first ``attention_examples`` questions with a
            one-box answer region per benchmark (``<benchmark>_<key>.png``).
        progress: a progress bar per benchmark (:func:`progress_bar`: None shows it on a terminal only).
    """
    report = report or MultipleChoiceReport()
    model.eval()
    device = next(model.parameters()).device
    for name, questions in benchmarks.items():
        start, count, drawn = time.perf_counter(), 0, 0
        for question in progress_bar(questions, name, "question", planned_questions, progress):
            options = render_options(tokenizer, question.question, question.options, answer_format=answer_format)
            sheet = None
            if (question.answer_region is not None and question.answer_region.box is not None
                    and not question.streamed and attention_dir is not None and drawn < attention_examples):
                sheet, drawn = Path(attention_dir) / f"{name}_{question.key}.png", drawn + 1
            try:
                if question.streamed:
                    scores, shares = _score_streamed(model, question, options, modes, device)
                else:
                    scores, shares = _score_batched(model, question, options, modes, device, sheet)
            except FrameDecodeError:
                continue  # a stream that failed part-way: its reader has counted the skip
            except StreamTooLong as err:
                raise StreamTooLong(f"benchmark {name!r}, question {question.key!r}: {err}") from err
            for mode, nll in scores.items():
                report.update(name, mode, question.category, int(nll.argmin()), question.answer)
            for mode, share in shares.items():
                report.update_share(name, mode, question.category, share)
            count += 1
        elapsed = time.perf_counter() - start
        log.info("%s: %d questions in %.1f s (%.2f s/question)", name, count, elapsed, elapsed / max(count, 1))
    return report


def _head_ids(model, options: OptionTokens) -> torch.Tensor | None:
    """The prompt tokens a question-first model reads before the frames (None for a visual-first one)."""
    question_len = question_length(model, options)
    return options.prefix_ids[:question_len] if question_len else None


def _score_batched(
    model, question: Question, options: OptionTokens, modes: tuple[str, ...], device: torch.device,
    sheet: Path | None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A question whose frames are one stack: (mode -> NLL per option, mode -> attention share), one patch pass
    shared by the scoring, the shares and the attention sheet (drawn at ``sheet`` when given)."""
    frames = normalize(question.frames).to(device)
    patches = model.encode_patches(frames)
    scores = score_question(model, frames, options, modes, patches=patches)
    region, shares = question.answer_region, {}
    if region is not None:
        shares = attention_shares(model, frames, region, question.times, modes, patches, _head_ids(model, options))
        if sheet is not None:
            save_region_sheet(model, question, sheet, patches)
    return scores, shares


def _score_streamed(
    model, question: Question, options: OptionTokens, modes: tuple[str, ...], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A question whose frames are read one at a time: the same results from one pass over them."""
    frames = (normalize(frame).to(device) for frame in question.frames)
    region = question.answer_region
    result = score_stream(model, frames, options, modes, region, num_frames=len(question.frames))
    shares = {}
    if region is not None:
        shares = {mode: region_share(per_frame, question.times, region.start)
                  for mode, per_frame in result.shares.items()}
    return result.scores, shares


@torch.no_grad()
def evaluate_baseline(
    scorer, benchmarks: Mapping[str, Iterable[Question]], report: MultipleChoiceReport, label: str = "smolvlm2",
    progress: bool | None = None,
) -> MultipleChoiceReport:
    """Score a baseline (e.g. :class:`fovlm.eval.baseline.SmolVLMScorer`) under the same protocol; its results
    are filed as the mode ``label`` of each benchmark."""
    for name, questions in benchmarks.items():
        for question in progress_bar(questions, f"{name} ({label})", "question", planned_questions, progress):
            nll = scorer.score(question)
            report.update(name, label, question.category, int(nll.argmin()), question.answer)
    return report


@torch.no_grad()
def validation_losses(
    model, batches: Iterable[dict], modes: tuple[str, ...] = MODES, report: MultipleChoiceReport | None = None,
    progress: bool | None = None,
) -> MultipleChoiceReport:
    """Answer-only token cross-entropy per source in each mode, over SFT-format batches (:func:`fovlm.data.collate.collate`).

    Sums token NLLs and counts per source, so each source's loss is its token mean over the whole set.
    """
    report = report or MultipleChoiceReport()
    head = AnswerOnlyCE()
    model.eval()
    device = next(model.parameters()).device
    for batch in progress_bar(batches, "val", "batch", progress=progress):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for mode in modes:
            out = head(model, batch, mode=mode)
            for source, loss, weight in zip(batch["source"], out.sample_loss.tolist(), out.sample_weight.tolist()):
                if weight > 0:
                    report.update_loss(mode, source, loss, weight)
    return report


def _benchmark_arg(value: str) -> tuple[str, str]:
    name, sep, shards = value.partition("=")
    if not sep or not name or not shards:
        raise argparse.ArgumentTypeError(f"expected NAME=SHARDS (folder, glob or brace pattern), got {value!r}")
    return name, shards


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fovlm eval", description="Multiple-choice evaluation in three modes.")
    parser.add_argument("--model", required=True, help="exported folder or Lightning checkpoint (.ckpt)")
    parser.add_argument("--benchmark", type=_benchmark_arg, action="append", required=True, metavar="NAME=SHARDS",
                        help="a benchmark's multiple-choice shards (repeatable)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--limit", type=int, help="at most this many questions per benchmark")
    parser.add_argument("--answer-format", choices=ANSWER_FORMATS, default="letter",
                        help="score 'B. option' (letter, the fVLM original's protocol), the option text alone (text), "
                             "or the option text after the question without its options listed (cloze)")
    parser.add_argument("--image-frames", type=int, help="frames an image is replicated to (default: as trained)")
    parser.add_argument("--frame-size", type=int, help="frame side in pixels (default: as the model was trained)")
    parser.add_argument("--max-frames", type=int, help="most frames of a video (default: as trained)")
    parser.add_argument("--stream-above", type=int, default=64, metavar="N",
                        help="decode a video that gives more than N frames one frame at a time and score it in one "
                             "streamed pass (default: 64); shorter clips are decoded up front and scored in one batch")
    parser.add_argument("--num-queries", type=int,
                        help="visual tokens per frame k, 1..the model's num_queries (default: all of them)")
    parser.add_argument("--out", default="results.json", help="results JSON path")
    parser.add_argument("--tensorboard", help="also log the results to this TensorBoard folder")
    parser.add_argument("--per-category", action="store_true", help="print one table row per category")
    parser.add_argument("--attention-examples", type=int, default=0, metavar="N",
                        help="save where the queries look on the first N questions with an answer region")
    parser.add_argument("--attention-dir", default="attention", help="folder of those PNGs (default: attention)")
    parser.add_argument("--baseline", help="also score this SmolVLM2 model (hub id or folder) on the same questions")
    parser.add_argument("--val", nargs="+", metavar="SHARDS",
                        help="SFT-format shards: also report the answer-only loss per source in each mode")
    parser.add_argument("--val-batch-size", type=int, default=4)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they show on a terminal only)")
    args = parser.parse_args(argv)
    if args.stream_above < 0:
        parser.error(f"--stream-above must be >= 0, got {args.stream_above}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fovlm eval``; returns the exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[AboveBars()])
    progress = False if args.quiet else None
    if args.quiet:  # the libraries' bars too (loading weights)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        model, tokenizer, data = load_any(args.model, args.device, args.tokenizer)
        use_queries(model, args.num_queries, args.model)
        frames = data.overridden(args.frame_size, args.max_frames, args.image_frames).as_dict()
        readers = {name: BenchmarkReader(name, shards, limit=args.limit, stream_above=args.stream_above, **frames)
                   for name, shards in args.benchmark}
        report = evaluate(model, tokenizer, readers, tuple(args.modes), answer_format=args.answer_format,
                          attention_dir=args.attention_dir, attention_examples=args.attention_examples,
                          progress=progress)
        if args.val:
            from fovlm.data.datamodules import SFTDataModule

            val_data = SFTDataModule(train_shards=args.val, val_shards=args.val, tokenizer=tokenizer.name_or_path,
                                     batch_size=args.val_batch_size, num_workers=0, **frames)
            val_data.tokenizer = tokenizer  # the model's own (a checkpoint's stored one has no folder to load)
            val_data.setup("validate")
            validation_losses(model, val_data.val_dataloader(), tuple(args.modes), report, progress)
        if args.baseline:
            from fovlm.eval.baseline import SmolVLMScorer

            # The baseline reads a question's frames as one stack.
            stacked = {name: BenchmarkReader(name, shards, limit=args.limit, **frames) for name, shards in args.benchmark}
            evaluate_baseline(SmolVLMScorer(args.baseline, device=args.device), stacked, report, progress=progress)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"fovlm eval: error: {err}", file=sys.stderr)
        return 1
    except (EmptyBenchmarkError, NoReadableSampleError, StreamTooLong) as err:
        # Data that gives nothing to score, or a question the settings cannot score, is a configuration error, as
        # argparse's are (exit code 2).
        where = "--val: " if isinstance(err, NoReadableSampleError) else ""
        print(f"fovlm eval: error: {where}{err}", file=sys.stderr)
        return 2
    for reader in readers.values():
        if reader.skipped:
            print(f"{reader.name}: skipped samples {dict(reader.skipped)}", file=sys.stderr)
    print(report.table(per_category=args.per_category))
    print(f"results written to {report.write_json(args.out)}")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard) as writer:
            report.log_to(writer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
