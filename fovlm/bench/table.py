"""The printed summary of a benchmark report: one (figure, value) row per headline figure, two columns.

Rows come in the report's order: matmul rates, the thread check, then per size and precision the training
rates, the autoregressive pass, generation, scoring and every RATIO of a naive way to fovlm's, the optimizer
step per size, peak memory (GPU run) and data loading.
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str]

_TRAINING = (("sft8", "SFT 8-frame"), ("sft8_frozen_vision", "SFT 8-frame, frozen vision"),
             ("mixed", "SFT mixed 1-64"), ("dpo", "DPO"))
_NAIVE_AUTOREGRESSIVE = (("naive_rebuilt_cache", "rebuilt K/V cache"), ("naive_recomputed_llm", "recomputed LLM"))
_GIB = 2**30


def format_value(value: Any) -> str:
    """Compact human formatting for the printed table."""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


fmt = format_value  # the short name the row builders use


def matmul_rows(results: dict[str, Any]) -> list[Row]:
    """The matmul rate per dtype (with the start and end measurements when both were taken)."""
    rows = []
    for name, rate in results["matmul"].items():
        text = f"{rate / 1e9:.1f} GFLOP/s"
        if "matmul_start" in results:
            text += (f" (better of {results['matmul_start'][name] / 1e9:.1f} at the start and "
                     f"{results['matmul_end'][name] / 1e9:.1f} at the end)")
        rows.append((f"matmul peak {name}", text))
    return rows


def thread_rows(results: dict[str, Any]) -> list[Row]:
    """The patch pass with 1 thread against the default count (CPU run only)."""
    if "threads" not in results:
        return []
    t = results["threads"]
    default = t["default_threads"]
    return [(f"patch pass fp32, {t['frames']} frames: 1 thread / {default} threads",
             f"{fmt(t['patch_pass_s_1_threads'])} s / {fmt(t[f'patch_pass_s_{default}_threads'])} s "
             f"(speed-up {fmt(t['default_vs_one_thread_speedup'])})")]


def training_text(t: dict[str, Any]) -> str:
    """Samples/s, step time, achieved FLOP/s and peak memory of one timed training configuration."""
    return (f"{fmt(t['samples_per_s'])} samples/s, {fmt(t['step_s'])} s/step, "
            f"{t['achieved_flop_per_s'] / 1e9:.1f} GFLOP/s = {100 * t['fraction_of_matmul_peak']:.0f}% "
            f"of matmul, peak RSS {t['peak_rss_bytes'] / _GIB:.2f} GiB "
            f"(+{(t['peak_rss_bytes'] - t['rss_before_bytes']) / _GIB:.2f} in the step)"
            + (f", device {t['peak_device_bytes'] / _GIB:.2f} GiB" if "peak_device_bytes" in t else ""))


def training_rows(tag: str, r: dict[str, Any]) -> list[Row]:
    """The training configurations at one size and precision, the DPO step and the frozen-vision ratio."""
    rows = [(f"{tag} {label}", training_text(r[key])) for key, label in _TRAINING if key in r]
    rows.append((f"{tag} DPO step / SFT step", fmt(r["dpo"]["step_vs_sft8_step"])))
    if "sft8_frozen_vision" in r:
        rows.append((f"{tag} RATIO frozen vision / trained vision (SFT 8-frame step)",
                     fmt(r["sft8_frozen_vision"]["step_vs_trained_vision"])))
    return rows


def autoregressive_rows(tag: str, ar: dict[str, Any]) -> list[Row]:
    """Time per frame at each clip length, its growth, and the naive ways against the cached pass."""
    per_frame = ", ".join(f"{k}: {1e3 * v['per_frame_s']:.1f} ({1e3 * v['loop_per_frame_s']:.1f})"
                          for k, v in ar["fovlm"].items())
    rows = [(f"{tag} autoregressive ms/frame (loop only)", per_frame),
            (f"{tag} autoregressive per-frame growth max/min frames",
             f"{fmt(ar['per_frame_growth'])} (loop only {fmt(ar['loop_per_frame_growth'])})")]
    for key, label in _NAIVE_AUTOREGRESSIVE:
        for count, v in ar[key].items():
            rows.append((f"{tag} RATIO autoregressive {label} / cached, {count} frames",
                         f"{fmt(v['ratio_vs_fovlm_loop'])} ({1e3 * v['loop_per_frame_s']:.1f} ms/frame)"))
    return rows


def answering_rows(tag: str, r: dict[str, Any]) -> list[Row]:
    """Generation tokens/s and 3-mode scoring (shared, and per-option where timed)."""
    g, s = r["generation"], r["scoring"]
    text = f"{fmt(s['shared_s'])} s shared"
    if "ratio" in s:
        text += f", {fmt(s['naive_per_option_s'])} s per-option; RATIO {fmt(s['ratio'])}"
    return [(f"{tag} generation", f"{fmt(g['tokens_per_s'])} tokens/s, answer of {g['new_tokens']} tokens "
             f"after {g['frames']} frames in {fmt(g['answer_s'])} s"),
            (f"{tag} 3-mode scoring, 4 options, {s['frames']} frames", text)]


def naive_rows(tag: str, r: dict[str, Any]) -> list[Row]:
    """The RATIO of each naive training-side variant timed at this precision (padded layout, lm_head, K/V)."""
    rows = []
    if "mixed_padded" in r:
        rows.append((f"{tag} RATIO padded layout / per-sample (mixed batch step)",
                     fmt(r["mixed_padded"]["ratio_vs_per_sample"])))
    if "mixed_padded_frames_encoded" in r:
        rows.append((f"{tag} RATIO padded frames through DINO / per-sample",
                     fmt(r["mixed_padded_frames_encoded"]["ratio_vs_per_sample"])))
    if "sft8_sdpa_attention" in r:
        rows.append((f"{tag} RATIO SDPA / matmul attention in the patch pass (SFT 8-frame step)",
                     fmt(r["sft8_sdpa_attention"]["ratio_vs_auto"])))
    if "sft8_full_lm_head" in r:
        rows.append((f"{tag} RATIO lm_head on all text / scored rows (step)",
                     fmt(r["sft8_full_lm_head"]["ratio_vs_scored_rows"])))
    if "kv" in r:
        kv = r["kv"]
        rows.append((f"{tag} RATIO K/V twice / once (patch pass, {kv['frames']} frames)",
                     f"forward {fmt(kv['ratio_forward'])}, forward+backward {fmt(kv['ratio_train'])}"))
    return rows


def packing_rows(size: str, res: dict[str, Any]) -> list[Row]:
    """Padding share per mix and LLM pass, unpacked and packed, and the packed step against the unpacked one."""
    rows = []
    for name, figures in res.get("padding", {}).items():
        shares = " | ".join(f"{label} {100 * f['query_pass']:.1f}% / {100 * f['text_pass']:.1f}%"
                            for label, f in figures.items())
        rows.append((f"{size} padding share, {name} mix (query pass / text pass)", shares))
    for precision in ("fp32", "bf16"):
        r = res.get(precision, {}).get("packing")
        if r:
            rows.append((f"{size}/{precision} RATIO unpacked / packed step, stage-2 mix of {len(r['num_frames'])}",
                         f"{fmt(r['unpacked_vs_packed'])} ({fmt(r['unpacked']['step_s'])} s / "
                         f"{fmt(r['packed']['step_s'])} s; {fmt(r['unpacked']['tokens_per_s'])} / "
                         f"{fmt(r['packed']['tokens_per_s'])} tokens/s)"))
    return rows


def size_rows(size: str, res: dict[str, Any]) -> list[Row]:
    """Every row of one size: each precision's sections, then the optimizer step."""
    rows: list[Row] = []
    for precision in ("fp32", "bf16"):
        if precision not in res:
            continue
        r, tag = res[precision], f"{size}/{precision}"
        rows += training_rows(tag, r) + autoregressive_rows(tag, r["autoregressive"])
        rows += answering_rows(tag, r) + naive_rows(tag, r)
    rows += packing_rows(size, res)
    o = res["optimizer"]
    rows.append((f"{size} AdamW step foreach / fused ({o['parameters'] / 1e6:.1f}M params)",
                 f"{fmt(o['foreach_step_s'])} s / {fmt(o['fused_step_s'])} s = {fmt(o['foreach_vs_fused'])}"))
    return rows


def memory_rows(results: dict[str, Any]) -> list[Row]:
    """Peak device memory and RSS of one training step per model shape (GPU run)."""
    rows = []
    for name, m in results.get("memory", {}).items():
        device = f"{m['peak_device_bytes'] / _GIB:.2f} GiB device" if "peak_device_bytes" in m else "no device"
        rows.append((f"memory {name}, batch {m['batch']} x {m['frames']} frames",
                     f"{device}, peak RSS {m['peak_rss_bytes'] / _GIB:.2f} GiB, step {fmt(m['step_s'])} s, "
                     f"{m['parameters'] / 1e6:.0f}M params"))
    return rows


def data_rows(results: dict[str, Any]) -> list[Row]:
    """Raw decode rate and SFTDataModule samples/s per worker count."""
    if "data" not in results:
        return []
    d = results["data"]
    rows = [("raw JPEG decode+resize", f"{fmt(d['raw_decode_frames_per_s'])} frames/s = "
             f"{fmt(d['raw_decode_samples_per_s'])} samples/s of {d['frames_per_sample']} frames")]
    for workers, v in d["datamodule"].items():
        rows.append((f"SFTDataModule, {workers} workers", f"{fmt(v['samples_per_s'])} samples/s "
                     f"({fmt(v['vs_raw_decode'])} x raw decode; first batch after {fmt(v['first_batch_s'])} s)"))
    return rows


def summary_rows(results: dict[str, Any]) -> list[Row]:
    """The printed table: (figure, value) rows."""
    rows = matmul_rows(results) + thread_rows(results)
    for size in ("tiny", "real"):
        if size in results:
            rows += size_rows(size, results[size])
    return rows + memory_rows(results) + data_rows(results)


def print_table(rows: list[Row]) -> None:
    """Two aligned columns on stdout."""
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 60))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 60))
