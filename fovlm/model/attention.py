"""The DINO attention kernel: PyTorch's SDPA, or plain matmuls where they are measured to be faster.

On a CPU, SDPA's bf16 kernel runs far below the bf16 matmul rate (about 45 GFLOP/s against about 470 on the
machine of docs/measured.md#attention-kernel-on-the-cpu), while two batched bf16 matmuls and a softmax do the same
attention faster. Forward + backward over 16 frames x 6 heads x 257 keys in bf16 (2 threads, quiet machine),
SDPA / matmul: 9.4 / 10.2 ms at 1 query (the query passes), 14.2 / 13.9 at 8, 27.8 / 17.5 at 64 and 76.3 / 44.4
at 257 (the patch pass); on 1 thread 15.0 / 12.8 at 1 query and 94.5 / 64.6 at 257; and the whole bf16 SFT step
(2 x 8 frames) was fastest with the matmul kernel in every pass (docs/measured.md#attention-kernel-on-the-cpu).
``auto`` therefore takes the matmul kernel for bf16 / fp16 on a CPU and SDPA everywhere else (fp32 on a CPU,
where SDPA's kernel is the faster one; every GPU, where SDPA's fused kernels are). The matmul kernel keeps the
[n, h, Lq, Lk] probabilities for backward (SDPA keeps a row statistic only): its memory cost, about 150 MB for a
bf16 patch pass over 16 frames at 224 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("auto", "sdpa", "matmul")


def resolve(kernel: str, q: Tensor) -> str:
    """The kernel ``kernel`` stands for with these queries: ``sdpa`` or ``matmul``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    if kernel != "auto":
        return kernel
    half = q.dtype in (torch.bfloat16, torch.float16)
    return "matmul" if half and q.device.type == "cpu" else "sdpa"


def attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float = 0.0, return_weights: bool = False,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention without a mask -> (output [n, h, Lq, hd], weights [n, h, Lq, Lk] or None).

    With ``return_weights`` the probabilities are computed in float32 whatever the kernel (for attention maps
    and the look loss, which trains through them); otherwise the ``kernel`` of :func:`resolve` runs.

    Args:
        q: queries [n, h, Lq, hd]; k, v: keys and values [n, h, Lk, hd].
        scale: factor on the scores (1 / sqrt(hd) for DINOv2).
        dropout_p: dropout on the probabilities (training only).
        return_weights: also return the probabilities (float32, in the autograd graph: detach them to keep).
        kernel: ``auto``, ``sdpa`` or ``matmul``.
    """
    if return_weights:
        weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)  # [n, h, Lq, Lk]
        return F.dropout(weights.to(q.dtype), p=dropout_p) @ v, weights
    if resolve(kernel, q) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale), None
    probabilities = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)  # [n, h, Lq, Lk]
    return F.dropout(probabilities, p=dropout_p) @ v, None
