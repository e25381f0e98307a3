"""``fovlm stream VIDEO --model M --ask SECONDS:QUESTION ...``: a video read one frame at a time, questions
answered at their moments.

Frames are decoded one at a time at ``--fps`` (:func:`fovlm.data.frame_stream.open_frames`: a video file, a folder
of frames) and pushed through a :class:`fovlm.model.streaming.StreamingSession`; a question asked at ``SECONDS``
is answered from the frames up to that moment (timestamps at or before it), and the stream goes on. Answers are
printed with their timestamps; a progress bar of frames goes to stderr.

With a question-first model the first question is its standing question: its system and user turn go into the
cache before the frames (as in training); later questions are new user turns after the frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fovlm.data.chat import SYSTEM_PROMPT
from fovlm.data.frame_stream import StreamFrame, open_frames
from fovlm.data.frames import FrameDecodeError, normalize
from fovlm.eval.predict import prompt_ids, question_length, stop_ids
from fovlm.model.checkpoint import CheckpointError
from fovlm.model.generate import Sampling
from fovlm.model.pretrained import load_any, use_queries
from fovlm.model.streaming import POLICIES, CachePolicy, StreamFull, StreamingSession


@dataclass(frozen=True, order=True)
class Question:
    """A question and the moment it is asked (seconds into the stream)."""

    at_s: float
    text: str


def parse_ask(value: str) -> Question:
    """``SECONDS:QUESTION`` -> :class:`Question` (argparse type)."""
    seconds, sep, text = value.partition(":")
    try:
        at = float(seconds)
    except ValueError:
        at = -1.0
    if not sep or not text.strip() or at < 0:
        raise argparse.ArgumentTypeError(f"--ask takes SECONDS:QUESTION with SECONDS >= 0, got {value!r}")
    return Question(at, text.strip())


def follow_up_ids(tokenizer, question: str, system_prompt: str = SYSTEM_PROMPT) -> Tensor:
    """A later question as a new user turn, up to ``<|im_start|>assistant\\n`` (no system turn) -> long [P]."""
    full = prompt_ids(tokenizer, question, system_prompt)
    system = tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}], tokenize=False)
    return full[len(tokenizer(system, add_special_tokens=False)["input_ids"]):]


def run_stream(model, tokenizer, frames: Iterable[StreamFrame], questions: list[Question], policy: CachePolicy,
               max_new_tokens: int = 200, sampling: Sampling | None = None, progress: bool = True) -> dict[str, Any]:
    """Stream ``frames`` through a session and answer each question at its moment -> the answers and the figures.

    Returns:
        ``{"answers": [{"at_s", "frames", "question", "answer"}], "frames", "seconds", "frames_per_s",
        "cache_bytes", "evicted", "dropped"}`` (``dropped``: frames a live source's
        :class:`fovlm.data.frame_stream.LatestFrame` pushed out before the model read them).
    """
    from tqdm import tqdm

    device = model.q_init.device
    pending = sorted(questions)
    head, first_tail = None, None
    if model.question_first and pending:
        ids = prompt_ids(tokenizer, pending[0].text)
        cut = question_length(tokenizer, pending[0].text)
        head, first_tail = ids[:cut], ids[cut:]
    session = StreamingSession(model, policy, head)
    answers: list[dict[str, Any]] = []

    def ask(question: Question) -> None:
        if first_tail is not None and not answers:
            ids = first_tail
        elif model.question_first:
            ids = follow_up_ids(tokenizer, question.text)
        else:
            ids = prompt_ids(tokenizer, question.text)
        out = session.answer(ids, stop_ids(tokenizer), max_new_tokens, sampling or Sampling())
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
        answers.append({"at_s": question.at_s, "frames": session.frames_seen, "question": question.text,
                        "answer": text})
        tqdm.write(f"[{question.at_s:8.1f} s, {session.frames_seen} frames] {question.text}\n    {text}")

    started = time.perf_counter()
    for item in tqdm(frames, desc="frames", unit="frame", disable=not progress, file=sys.stderr):
        while pending and pending[0].at_s < item.time_s:
            ask(pending.pop(0))
        session.push(normalize(item.frame[None])[0].to(device))
    seconds = time.perf_counter() - started
    while pending:
        ask(pending.pop(0))
    return {"answers": answers, "frames": session.frames_seen, "seconds": seconds,
            "frames_per_s": session.frames_seen / seconds if seconds > 0 else 0.0,
            "cache_bytes": session.cache_bytes(), "evicted": session.evicted,
            "dropped": int(getattr(frames, "dropped", 0))}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fovlm stream", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("media", help="video file or folder of frames")
    parser.add_argument("--model", required=True, help="exported folder or Lightning checkpoint (.ckpt)")
    parser.add_argument("--ask", type=parse_ask, action="append", default=[], metavar="SECONDS:QUESTION",
                        help="a question asked at that moment (repeatable); with none, the stream is only read")
    parser.add_argument("--cache", choices=POLICIES, default="window", help="LLM cache policy")
    parser.add_argument("--sink-frames", type=int, default=4, help="window: first frames always kept")
    parser.add_argument("--window-frames", type=int, default=512, help="window: most recent frames kept")
    parser.add_argument("--evict-frames", type=int, default=128, help="window: frames dropped at once")
    parser.add_argument("--fps", type=float, default=1.0, help="frames read per second of video")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--frame-size", type=int, help="frame side in pixels (default: as the model was trained)")
    parser.add_argument("--num-queries", type=int, help="visual tokens per frame k (default: all of the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument("--out", help="also write the answers and figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.fps <= 0 or args.max_new_tokens < 1:
        parser.error("need --fps > 0 and --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fovlm stream``; prints each answer with its moment, returns the exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        window = CachePolicy("window", args.sink_frames, args.window_frames, args.evict_frames)
        policy = window if args.cache == "window" else CachePolicy("full")
        model, tokenizer, data = load_any(args.model, args.device, args.tokenizer)
        use_queries(model, args.num_queries, args.model)
        size = data.overridden(args.frame_size).frame_size
        frames = open_frames(args.media, fps=args.fps, size=size, max_frames=args.max_frames)
        result = run_stream(model, tokenizer, frames, args.ask, policy, args.max_new_tokens, progress=not args.quiet)
    except (FrameDecodeError, CheckpointError, FileNotFoundError, StreamFull, ValueError) as err:
        print(f"fovlm stream: error: {err}", file=sys.stderr)
        return 1
    print(f"{result['frames']} frames in {result['seconds']:.1f} s ({result['frames_per_s']:.2f} frames/s); "
          f"LLM cache {result['cache_bytes'] / 2**20:.1f} MiB, {result['evicted']} frames evicted", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
