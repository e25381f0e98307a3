"""Helpers shared by the model tests (imported by name: pytest puts this folder on sys.path)."""

import torch

QUERY_DIM = 32  # differs from DINO (64) and LLM (64 but a separate space) widths, so shape mix-ups fail
TOL = dict(atol=1e-5, rtol=1e-5)


def random_frames(n: int, size: int = 224) -> torch.Tensor:
    """n random frames [n, 3, size, size] in roughly ImageNet-normalised range."""
    return torch.randn(n, 3, size, size)
