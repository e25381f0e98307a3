"""The attention kernels: the matmul kernel equals SDPA in fp32 and stays within bf16 tolerance in bf16."""

import pytest
import torch
from tiny_models import random_frames

from fovlm.model.attention import attend, resolve
from fovlm.model.encoder import FoveatedEncoder


def qkv(dtype=torch.float32, lq=257):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, lq, 16, generator=gen)
    k, v = torch.randn(3, 4, 257, 16, generator=gen), torch.randn(3, 4, 257, 16, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("lq", [257, 2])  # the patch pass, and k = 2 queries reading a frame
def test_matmul_kernel_equals_sdpa_in_fp32(lq):
    outs, grads = [], []
    for kernel in ("sdpa", "matmul"):
        q, k, v = qkv(lq=lq)
        out, weights = attend(q, k, v, 0.25, kernel=kernel)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
        assert weights is None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_kernels_stay_within_bf16_tolerance_of_fp32():
    reference, _ = attend(*qkv(), 0.25, kernel="sdpa")
    for kernel in ("sdpa", "matmul"):
        out, _ = attend(*qkv(torch.bfloat16), 0.25, kernel=kernel)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference.detach(), atol=2e-2, rtol=2e-2)


def test_auto_takes_matmul_for_half_precision_on_the_cpu_only():
    patch_pass = (1, 6, 257, 64)  # [n, h, Lq, hd]
    assert resolve("auto", torch.zeros(patch_pass, dtype=torch.bfloat16)) == "matmul"
    assert resolve("auto", torch.zeros(patch_pass, dtype=torch.float16)) == "matmul"
    assert resolve("auto", torch.zeros(1, 6, 2, 64, dtype=torch.bfloat16)) == "matmul"  # a query pass
    assert resolve("auto", torch.zeros(patch_pass)) == "sdpa"
    assert resolve("sdpa", torch.zeros(patch_pass, dtype=torch.bfloat16)) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention kernel"):
        resolve("flash", torch.zeros(1, 1, 1, 1))


def test_bf16_patch_pass_with_either_kernel_agrees(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=32).eval()
    frames, queries = random_frames(2), torch.randn(2, 3, 32)
    results = {}
    for kernel in ("sdpa", "auto"):
        encoder.attention_kernel = kernel
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            cache = encoder.encode_patches(frames)
            results[kernel] = (cache.features.float(), encoder.query_attend(queries, cache)[0].float())
    for a, b in zip(results["auto"], results["sdpa"], strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
