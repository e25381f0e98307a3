"""Visual-encoding sections: the patch pass with K/V projected once vs twice, and the autoregressive pass.

The autoregressive pass of one clip is timed per frame at several lengths, against the naive ways
(:func:`fovlm.bench.naive.autoregressive_naive`: the K/V cache rebuilt, or the LLM prefix recomputed, at
every frame).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fovlm.bench.measure import Env, timed
from fovlm.bench.naive import autoregressive_naive, patch_pass_kv_twice


def kv_once_vs_twice(env: Env, model, frames: Tensor, repeats: int) -> dict[str, float]:
    """Patch pass with K/V projected once (fovlm) vs twice (HF layer + cache), forward and forward+backward."""
    encoder = model.encoder

    def forward(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), env.autocast():
                fn(frames)
        return run

    def train(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with env.autocast():
                cache = fn(frames)
                loss = sum(k.float().mean() + v.float().mean() for k, v in zip(cache.keys, cache.values, strict=True))
                loss = loss + cache.features.float().mean()
            loss.backward()
            encoder.zero_grad(set_to_none=True)
        return run

    once = encoder.encode_patches
    twice = lambda f: patch_pass_kv_twice(encoder, f)  # noqa: E731
    result = {
        "frames": frames.shape[0],
        "once_forward_s": timed(env, forward(once), repeats),
        "twice_forward_s": timed(env, forward(twice), repeats),
        "once_train_s": timed(env, train(once), repeats),
        "twice_train_s": timed(env, train(twice), repeats),
    }
    result["ratio_forward"] = result["twice_forward_s"] / result["once_forward_s"]
    result["ratio_train"] = result["twice_train_s"] / result["once_train_s"]
    return result


@torch.no_grad()
def autoregressive_figures(env: Env, model, frame_counts: Sequence[int], naive_counts: Sequence[int],
                           image_size: int, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Autoregressive visual pass of one clip: time per frame at each length, and the naive ways at some.

    ``naive_counts`` (may be empty) are the lengths at which the naive passes are timed too.
    """
    model.eval()
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"fovlm": {}, "naive_rebuilt_cache": {}, "naive_recomputed_llm": {}}
    with env.autocast():  # first-call costs (cache objects, kernels) paid here, outside every timing
        small = torch.randn(2, 3, image_size, image_size, generator=gen).to(env.device)
        model.autoregressive_prefix(model.encode_patches(small), torch.tensor([2], device=env.device))
    for count in frame_counts:
        frames = torch.randn(count, 3, image_size, image_size, generator=gen).to(env.device)
        num_frames = torch.tensor([count], device=env.device)
        with env.autocast():
            start = env.now()
            cache = model.encode_patches(frames)
            patch_s = env.now() - start
            loop_s = timed(env, lambda c=cache, n=num_frames: model.autoregressive_prefix(c, n), repeats, warmup)
            out["fovlm"][str(count)] = {
                "patch_pass_s": patch_s,
                "loop_s": loop_s,
                "per_frame_s": (patch_s + loop_s) / count,
                "loop_per_frame_s": loop_s / count,
            }
            if count in naive_counts:
                for key, recompute in (("naive_rebuilt_cache", False), ("naive_recomputed_llm", True)):
                    naive_s = timed(env, lambda c=cache, r=recompute: autoregressive_naive(model, c, r), 1, warmup=0)
                    out[key][str(count)] = {"loop_s": naive_s, "loop_per_frame_s": naive_s / count}
    first, last = str(min(frame_counts)), str(max(frame_counts))
    out["per_frame_growth"] = out["fovlm"][last]["per_frame_s"] / out["fovlm"][first]["per_frame_s"]
    out["loop_per_frame_growth"] = out["fovlm"][last]["loop_per_frame_s"] / out["fovlm"][first]["loop_per_frame_s"]
    for key in ("naive_rebuilt_cache", "naive_recomputed_llm"):
        for count, figures in out[key].items():
            figures["ratio_vs_fovlm_loop"] = figures["loop_s"] / out["fovlm"][count]["loop_s"]
    return out
