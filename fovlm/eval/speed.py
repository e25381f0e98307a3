"""Seconds per question of the shared multiple-choice scorer and of the fVLM original's way, same questions.

    python -m fovlm.eval.speed [--llm smollm2] [--vision dinov2-small-random] [--frames 8] [--options 4]
                               [--questions 3] [--threads N]

Both scorers rank the same random questions in all three modes; the script checks they agree (max |NLL
difference|) and prints the time per question of each and the speed-up. The defaults are the real size: random
DINOv2-small and the real SmolLM2-135M-Instruct (from ``prepare_smollm2``), 8 frames, 4 options.
"""

from __future__ import annotations

import argparse
import time

import torch

from fovlm.data.contract import FRAME_SETTINGS
from fovlm.eval.questions import render_options
from fovlm.eval.scoring import score_question, score_question_naive
from fovlm.model.loading import RANDOM_SMALL, SMOLLM2, build_vlm, load_tokenizer, prepare_smollm2
from fovlm.model.vlm import MODES

QUESTION = "What is the person in the video doing with the object on the table?"
OPTIONS = ("Picking it up and putting it back.", "Pushing it to the left.", "Turning it around.",
           "Nothing; the object stays where it is.", "Wiping it.", "Painting it.")


def measure(model, tokenizer, frames: int, options: int, questions: int) -> dict[str, float]:
    """Mean seconds per question of both scorers and the largest score difference between them."""
    layout = render_options(tokenizer, QUESTION, OPTIONS[:options])
    clips = [torch.randn(frames, 3, FRAME_SETTINGS.frame_size, FRAME_SETTINGS.frame_size) for _ in range(questions)]
    score_question(model, clips[0][:2], layout, MODES)  # warm-up (allocations, kernels)
    times = {"shared": 0.0, "naive": 0.0}
    worst = 0.0
    for clip in clips:
        start = time.perf_counter()
        shared = score_question(model, clip, layout, MODES)
        times["shared"] += time.perf_counter() - start
        start = time.perf_counter()
        naive = score_question_naive(model, clip, layout, MODES)
        times["naive"] += time.perf_counter() - start
        worst = max(worst, max(float((shared[m] - naive[m]).abs().max()) for m in MODES))
    return {"shared_s": times["shared"] / questions, "naive_s": times["naive"] / questions, "max_abs_diff": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fovlm.eval.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default=SMOLLM2)
    parser.add_argument("--vision", default=RANDOM_SMALL)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--options", type=int, default=4, choices=range(2, len(OPTIONS) + 1))
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_vlm(args.llm, args.vision).eval()
    tokenizer = load_tokenizer(str(prepare_smollm2()) if args.llm in (SMOLLM2, "tiny") else args.llm)
    result = measure(model, tokenizer, args.frames, args.options, args.questions)
    print(f"{args.llm} + {args.vision}, {args.frames} frames, {args.options} options, 3 modes, "
          f"{args.questions} questions, {torch.get_num_threads()} threads")
    print(f"shared scorer:       {result['shared_s']:.2f} s/question")
    print(f"fVLM original's way: {result['naive_s']:.2f} s/question")
    print(f"speed-up:            {result['naive_s'] / result['shared_s']:.1f}x  (max |NLL diff| {result['max_abs_diff']:.2e})")


if __name__ == "__main__":
    main()
