"""Helpers shared by the model tests (imported by name: pytest puts this folder on sys.path)."""

import torch

QUERY_DIM = 32  # differs from DINO (64) and LLM (64 but a separate space) widths, so shape mix-ups fail
TOL = dict(atol=1e-5, rtol=1e-5)


def random_frames(n: int, size: int = 224) -> torch.Tensor:
    """n random frames [n, 3, size, size] in roughly ImageNet-normalised range."""
    return torch.randn(n, 3, size, size)


def assert_shared_scoring_is_per_option_scoring(model, frames: torch.Tensor, options) -> None:
    """Scoring with the shared patch pass and prefix equals running every option as its own sequence, per mode."""
    from fovlm.eval.scoring import score_question, score_question_naive
    from fovlm.model.vlm import MODES

    with torch.no_grad():
        shared = score_question(model, frames, options, MODES)
        naive = score_question_naive(model, frames, options, MODES)
    for mode in MODES:
        torch.testing.assert_close(shared[mode], naive[mode], **TOL)
