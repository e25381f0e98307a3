"""The benchmark: analytic FLOPs against PyTorch's FLOP counter, the naive variants against the model, dry runs."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fovlm.bench import flops, naive
from fovlm.bench.data_loading import data_figures
from fovlm.bench.inputs import sft_batch
from fovlm.model.loading import build_vlm


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vlm("tiny", "tiny").eval()


def counted(fn) -> int:
    """FLOPs counted by PyTorch; the math SDPA backend, so attention runs as matmuls the counter sees."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_patch_and_query_pass_flops_match_the_counter(model):
    shape = flops.ModelShape.of(model)
    frames = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert counted(lambda: model.encode_patches(frames)) == 3 * flops.patch_pass(shape)
        cache = model.encode_patches(frames)
        queries = torch.randn(3, model.query_dim)
        assert counted(lambda: model.read_frames(queries, cache)) == 3 * flops.query_pass(shape)


def test_llm_and_head_flops_match_the_counter(model):
    shape = flops.ModelShape.of(model)
    embeds = torch.randn(2, 11, shape.llm_width)
    mask = torch.ones(2, 11, dtype=torch.long)
    positions = torch.arange(11)[None].expand(2, -1)
    with torch.no_grad():
        assert counted(lambda: model.llm_hidden(embeds, mask, positions)) == 2 * flops.llm_pass(shape, 11)
        hidden = torch.randn(5, shape.llm_width)
        assert counted(lambda: model.lm_head(hidden)) == flops.lm_head(shape, 5)
        assert counted(lambda: model.query_head(hidden)) == flops.query_head(shape, 5)


def test_forward_flops_of_a_coarse_fine_batch_match_the_counter(model):
    shape = flops.ModelShape.of(model)
    batch = sft_batch([3, 5], 24, 224, shape.vocab)
    from fovlm.losses import answer_only_mask, selected_targets, shift_labels

    logits_mask, _, _ = selected_targets(shift_labels(batch["input_ids"], answer_only_mask(batch["roles"])))
    measured = counted(lambda: model(batch["frames"], batch["num_frames"], batch["input_ids"],
                                     batch["attention_mask"], logits_mask=logits_mask))
    # The model runs the coarse LLM pass and [visual ; text] with every row padded to the batch's widest sample;
    # the analytic count covers each sample's real tokens only, so it is a lower bound that padding widens.
    analytic = flops.train_step(shape, [3, 5], [24, 24], int(logits_mask.sum())) / 3
    assert analytic <= measured < 1.05 * analytic


def test_a_frozen_backbone_skips_the_patch_pass_backward(model):
    """With DINOv2 frozen, backward costs at most 2 x the forward of everything but the patch pass (the patch pass
    runs forward only); trained, it costs more. The analytic frozen step is an upper bound."""
    shape = flops.ModelShape.of(model)
    batch = sft_batch([3, 5], 24, 224, shape.vocab)
    mask = batch["attention_mask"].bool()

    def forward():
        return model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                     logits_mask=mask)

    def step():
        forward().logits.float().logsumexp(-1).sum().backward()

    rest = counted(forward) - 8 * flops.patch_pass(shape)  # forward FLOPs outside the patch pass
    trained_backward = counted(step) - counted(forward)
    vision = list(model.encoder.dino.parameters())
    for param in vision:
        param.requires_grad_(False)
    try:
        frozen = counted(step)
    finally:
        for param in vision:
            param.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    assert frozen - counted(forward) <= 2 * rest < trained_backward
    assert frozen <= flops.train_step(shape, [3, 5], [24, 24], int(mask.sum()), frozen_vision=True)


def test_kv_twice_gives_the_same_cache(model):
    frames = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        once = model.encode_patches(frames)
        twice = naive.patch_pass_kv_twice(model.encoder, frames)
    torch.testing.assert_close(twice.features, once.features)
    for a, b in zip(once.keys + once.values, twice.keys + twice.values, strict=True):
        torch.testing.assert_close(a, b)


def test_padded_layout_equals_per_sample_when_nothing_is_padded(model):
    batch = sft_batch([4, 4], 24, 224, 49152)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                     logits_mask=mask).logits
        for encode_padding in (False, True):
            padded = naive.padded_coarse_fine_logits(model, batch["frames"], batch["num_frames"],
                                                     batch["input_ids"], mask, encode_padding)
            torch.testing.assert_close(padded, ours, atol=1e-4, rtol=1e-4)


def test_padded_layout_leaks_padding_into_shorter_samples(model):
    batch = sft_batch([2, 5], 24, 224, 49152)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                     logits_mask=mask).logits
        padded = naive.padded_coarse_fine_logits(model, batch["frames"], batch["num_frames"], batch["input_ids"], mask)
    rows = mask.sum(1).tolist()
    torch.testing.assert_close(padded[rows[0]:], ours[rows[0]:], atol=1e-4, rtol=1e-4)  # the longest clip
    assert not torch.allclose(padded[: rows[0]], ours[: rows[0]], atol=1e-3)  # the padded one differs


@pytest.mark.parametrize("recompute_llm", [False, True])
def test_naive_autoregressive_gives_the_same_tokens(model, recompute_llm):
    frames = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        cache = model.encode_patches(frames)
        ours = model.autoregressive_prefix(cache, torch.tensor([5])).tokens
        theirs = naive.autoregressive_naive(model, cache, recompute_llm)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_gpu_script_without_cuda_says_so(monkeypatch, capsys):
    from fovlm.bench import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", "unused.json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_dry_run_writes_every_figure(tmp_path):
    from fovlm.bench import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--no-data", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    bf16 = result["tiny"]["bf16"]
    for key in ("sft8", "sft8_frozen_vision", "mixed", "dpo", "mixed_padded", "sft8_full_lm_head"):
        assert bf16[key]["samples_per_s"] > 0 and bf16[key]["model_flop_per_step"] > 0
    assert set(bf16["autoregressive"]["fovlm"]) == {"2", "4"}
    assert bf16["scoring"]["ratio"] > 0 and bf16["kv"]["ratio_forward"] > 0
    assert set(result["memory"]) == {"stage1_135m", "stage1_135m_checkpointing", "shape_1p7b_checkpointing"}
    packing = bf16["packing"]
    assert packing["packed"]["step_s"] > 0 and packing["unpacked_vs_packed"] > 0
    assert bf16["sft8_sdpa_attention"]["ratio_vs_auto"] > 0  # on the CPU: today's SDPA against the matmul kernel


def test_data_figures_read_every_sample(tmp_path, smollm2_dir):
    result = data_figures(tmp_path, str(smollm2_dir), samples=4, frames=2, source_size=64, batch_size=2,
                          workers=(0,))
    assert result["datamodule"]["0"]["samples"] == 4
    assert result["raw_decode_frames_per_s"] > 0


def test_cpu_dry_run_at_two_queries_per_frame(tmp_path):
    """`make bench` at k = 2: the model sections run with 2 tokens per frame and count their FLOPs so; the naive
    one-token layouts are compared at k = 1 only."""
    from fovlm.bench.__main__ import main

    out = tmp_path / "cpu.json"
    assert main(["--dry-run", "--no-data", "--num-queries", "2", "--precisions", "fp32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["tiny"]
    assert result["shape"]["num_queries"] == 2
    fp32 = result["fp32"]
    assert fp32["sft8"]["samples_per_s"] > 0 and fp32["sft8"]["model_flop_per_step"] > 0
    assert "mixed_padded" not in fp32 and fp32["scoring"]["ratio"] > 0
    assert fp32["packing"]["packed"]["tokens_per_s"] > 0
    assert fp32["dpo_cached"]["online_module_bytes"] == 2 * fp32["dpo_cached"]["module_bytes"]  # one model, not two
    assert set(result["padding"]) == {"stage2", "synthetic", "stage3"}


def test_mix_draws_within_each_source():
    from fovlm.bench.mix import MIXES, draw

    frames, texts = draw(MIXES["stage2"], 400, torch.Generator().manual_seed(0))
    assert all(0 <= f <= 64 and 30 <= t <= 1000 for f, t in zip(frames, texts, strict=True))
    assert 0.08 < frames.count(0) / 400 < 0.20  # SmolTalk's 14%
    assert 0.35 < sum(f == 8 for f in frames) / 400  # images as 8 frames (47%), and some clips


def test_packing_leaves_at_most_five_percent_padding_on_the_stage2_mix():
    from fovlm.bench.mix import BATCH_SIZES, padding_figures
    from fovlm.bench.runner import PACKINGS

    for name, batch in (*BATCH_SIZES.items(), ("stage2", 32)):
        figures = padding_figures(name, batch, 1, PACKINGS, batches=100)
        assert figures["packed"]["text_pass"] <= 0.05 < figures["unpacked"]["text_pass"], (name, batch, figures)
        assert figures["packed"]["query_pass"] <= 0.05, (name, batch, figures)


def test_stream_bench_runs_and_bounds_the_window_cache(tmp_path, capsys):
    """`make bench-stream` at the tiny size: frames per second, cache bytes and RSS at each checkpoint."""
    from fovlm.bench.stream import main as stream_main

    out = tmp_path / "stream.json"
    assert stream_main(["--size", "tiny", "--precision", "fp32", "--checkpoints", "10,20,40", "--full-frames", "20",
                        "--window-frames", "6", "--evict-frames", "4", "--sink-frames", "2", "--frame-size", "56",
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    window, full = result["window"]["at"], result["full"]["at"]
    assert set(window) == {"10", "20", "40"} and set(full) == {"10", "20"}
    per_position = full["10"]["cache_bytes"] / full["10"]["positions"]
    assert full["20"]["cache_bytes"] == 2 * full["10"]["cache_bytes"]  # full: the cache grows with the stream
    assert window["40"]["positions"] <= 2 + 6 + 4 and window["40"]["cache_bytes"] <= 12 * per_position
    assert window["40"]["evicted"] > 0 and window["40"]["frames_per_s"] > 0
    assert "frames/s" in capsys.readouterr().out


def test_cached_dpo_section_holds_one_model_and_three_quarters_of_the_flops(tmp_path, capsys):
    """`python -m fovlm.bench.dpo_cache`: the DPO step from cached reference log-probabilities against the SFT step,
    next to its FLOP ratio (the policy's 3 pair forwards, not 4), holding one model instead of two."""
    from fovlm.bench.dpo_cache import main, probe, section

    out = tmp_path / "dpo_cache.json"
    assert main(["--dry-run", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["tiny"]["fp32"]["dpo_cached"]
    assert r["online_module_bytes"] == 2 * r["module_bytes"]
    assert r["flop_vs_sft8_step"] == pytest.approx(0.75 * r["online_flop_vs_sft8_step"])
    assert 1 < r["flop_vs_sft8_step"] < r["online_flop_vs_sft8_step"]
    assert r["step_vs_sft8_step"] > 0 and r["step_ratio_over_flop_ratio"] > 0
    assert "DPO step, cached reference / SFT step" in capsys.readouterr().out
    # --memory's child: one configuration per process, the cached one building only its own model
    section("tiny", "fp32", tmp_path, dry_run=True)
    held = {config: probe(config, "tiny", "fp32", tmp_path, dry_run=True) for config in ("dpo", "dpo_cached")}
    assert held["dpo"]["module_bytes"] == 2 * held["dpo_cached"]["module_bytes"]
    assert held["dpo_cached"]["peak_rss_bytes"] > held["dpo_cached"]["module_bytes"]
