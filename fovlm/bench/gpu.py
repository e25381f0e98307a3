"""``python -m fovlm.bench.gpu``: the CUDA benchmark behind ``make bench-gpu`` (at most ~8 minutes).

At real size (random DINOv2-small geometry + the real SmolLM2-135M-Instruct) in bf16-mixed (bf16 autocast
over fp32 weights) it measures the same figures as the CPU run (:mod:`fovlm.bench.runner`), with MFU against
the device's bf16 matmul rate measured in the same run, plus the peak device memory of one training step:

- stage 1 (all-text CE, coarse_fine) at batch 8 with 64-frame videos, without and with gradient checkpointing;
- the 1.7B shape (random SmolLM2-1.7B config: 24 layers, width 2048, 32 heads, MLP 8192, vocabulary 49152,
  with random DINOv2-small) with gradient checkpointing at batch 1 with a 64-frame video.

Without a CUDA device it prints "no CUDA device" and exits with status 2. ``--dry-run`` runs every section on
the CPU at the tiny size instead (the 1.7B shape replaced by the tiny LLM config), to check the code paths.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fovlm.bench import runner
from fovlm.bench.flops import ModelShape
from fovlm.bench.inputs import build_module, sft_batch, to_device
from fovlm.bench.measure import Env, PeakRSS, matmul_peaks
from fovlm.data.contract import FRAME_SETTINGS


def smollm2_1p7b_config():
    """Random SmolLM2-1.7B geometry: 24 layers, width 2048, 32 heads (no GQA), MLP 8192, vocabulary 49152."""
    from fovlm.model.loading import tiny_llm_config

    return tiny_llm_config(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                           intermediate_size=8192, max_position_embeddings=8192)


def memory_step(env: Env, model, batch: dict) -> dict[str, Any]:
    """One stage-1 training step (all-text CE, AdamW) -> seconds and peak device memory (or RSS on the CPU)."""
    from fovlm.losses import build_loss_head

    head = build_loss_head("all_text")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  fused=env.device.type == "cuda")
    batch = to_device(batch, env.device)
    model.train()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    with PeakRSS() as rss:
        start = env.now()
        with env.autocast():
            loss = head(model, batch, mode="coarse_fine").loss
        loss.backward()
        optimizer.step()
        seconds = env.now() - start
    out = {"step_s": seconds, "peak_rss_bytes": rss.peak,
           "parameters": sum(p.numel() for p in model.parameters())}
    if env.device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(env.device)
    del optimizer
    return out


def memory_sections(env: Env, dry_run: bool) -> dict[str, Any]:
    """Peak memory of stage 1 at batch 8 x 64 frames (135M), and of the 1.7B shape at batch 1 x 64 frames."""
    from transformers import Dinov2Model, LlamaForCausalLM

    from fovlm.model.loading import dinov2_small_config, tiny_llm_config, tiny_vision_config
    from fovlm.model.vlm import FoveatedVLM

    size = "tiny" if dry_run else "real"
    frames, batch_size = (4, 2) if dry_run else (64, 8)
    out: dict[str, Any] = {}
    for checkpointing in (False, True):
        runner.log(f"memory: stage 1, batch {batch_size} x {frames} frames, checkpointing {checkpointing}")
        module = build_module(size, "all_text", env.device, gradient_checkpointing=checkpointing)
        batch = sft_batch([frames] * batch_size, 64, FRAME_SETTINGS.frame_size, ModelShape.of(module.model).vocab)
        key = "stage1_135m_checkpointing" if checkpointing else "stage1_135m"
        out[key] = {"batch": batch_size, "frames": frames, **memory_step(env, module.model, batch)}
        del module
    runner.log(f"memory: 1.7B shape, batch 1 x {frames} frames, checkpointing")
    with env.device:  # built on the device: initialising 1.7B parameters on the host would take minutes
        vision = Dinov2Model(tiny_vision_config() if dry_run else dinov2_small_config())
        llm = LlamaForCausalLM(tiny_llm_config() if dry_run else smollm2_1p7b_config())
        model = FoveatedVLM(vision, llm)
    model.set_gradient_checkpointing(llm=True, vision=True)
    batch = sft_batch([frames], 64, FRAME_SETTINGS.frame_size, llm.config.vocab_size)
    out["shape_1p7b_checkpointing"] = {"batch": 1, "frames": frames, **memory_step(env, model, batch)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovlm.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu.json", help="JSON report path")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every section on the CPU at the tiny size (checks the code paths)")
    parser.add_argument("--no-data", action="store_true", help="skip the DataModule section")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: make bench-gpu needs a CUDA GPU (use --dry-run to check the code on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    env = Env(device, "bf16")
    started = time.time()
    results: dict[str, Any] = {"meta": runner.meta(args.dry_run)}
    if device.type == "cuda":
        results["meta"]["device"] = torch.cuda.get_device_name(device)
    runner.log("matmul peak")
    seconds, size = (0.3, 256) if args.dry_run else (3.0, 8192)
    results["matmul"] = matmul_peaks(env, size, seconds)
    size_name = "tiny" if args.dry_run else "real"
    results[size_name] = runner.run_size(size_name, ["bf16"], results["matmul"], args.dry_run, device)
    runner.save(results, Path(args.out))  # partial report, in case the memory sections run out of memory
    results["memory"] = memory_sections(env, args.dry_run)
    runner.finish(results, Path(args.out), started, args.dry_run, None if args.no_data else (0, 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
