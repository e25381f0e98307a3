"""Benchmark sections shared by the CPU run (``python -m fovlm.bench``) and the GPU run (``fovlm.bench.gpu``).

Every section returns a plain dict of figures (seconds, rates, bytes) for the JSON report. Timings exclude
warm-up calls and are the median of the timed repeats. Inputs are synthetic (random frames, token ids with
the chat roles laid out as a rendered conversation would have them): speed does not depend on their values.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

from fovlm.bench import flops
from fovlm.bench.naive import autoregressive_naive, padded_coarse_fine_logits, patch_pass_kv_twice
from fovlm.data.collate import pad_text
from fovlm.losses import (
    ROLE_ANSWER,
    ROLE_SYSTEM,
    ROLE_TEMPLATE,
    ROLE_USER,
    selected_targets,
    shift_labels,
    token_nll,
)

SIZES = {"tiny": ("tiny", "tiny"), "real": ("smollm2", "dinov2-small-random")}


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class Env:
    """Where and how a section runs.

    Attributes:
        device: torch device.
        precision: "fp32" or "bf16" (bf16 autocast over fp32 weights, as bf16-mixed training does).
    """

    device: torch.device
    precision: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for "bf16", nothing for "fp32"."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def now(self) -> float:
        """Wall-clock seconds after every queued device kernel has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class PeakRSS:
    """Highest resident set size of this process while the context is open (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = 0  # RSS when the context opened (models, optimizer states, allocator caches)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRSS:
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def timed(env: Env, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = env.now()
        fn()
        times.append(env.now() - start)
    return statistics.median(times)


def matmul_rate(env: Env, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Best FLOP/s of a square ``size`` matmul in ``dtype`` over about ``seconds`` of repeats."""
    a = torch.randn(size, size, device=env.device).to(dtype)
    b = torch.randn(size, size, device=env.device).to(dtype)
    torch.matmul(a, b)
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = env.now()
        torch.matmul(a, b)
        elapsed = env.now() - start
        spent += elapsed
        best = max(best, 2 * size**3 / elapsed)
    return best


def thread_check(frames: int = 4, image_size: int = 224) -> dict[str, float]:
    """fp32 DINOv2-small patch pass on the CPU with 1 thread and with the default count, in this run.

    On a machine whose cores other processes also use, every parallel op waits for the descheduled OpenMP
    thread and the multi-threaded run can be several times slower than one thread: this figure says whether
    the rest of the report was measured in that state.
    """
    from transformers import Dinov2Model

    from fovlm.model.encoder import FoveatedEncoder
    from fovlm.model.loading import dinov2_small_config

    encoder = FoveatedEncoder(Dinov2Model(dinov2_small_config())).eval()
    x = torch.randn(frames, 3, image_size, image_size)
    default = torch.get_num_threads()
    env = Env(torch.device("cpu"), "fp32")
    out: dict[str, float] = {"frames": frames, "default_threads": default}
    try:
        with torch.no_grad():
            for threads in sorted({1, default}):
                torch.set_num_threads(threads)
                out[f"patch_pass_s_{threads}_threads"] = timed(env, lambda: encoder.encode_patches(x), 2)
    finally:
        torch.set_num_threads(default)
    out["default_vs_one_thread_speedup"] = out["patch_pass_s_1_threads"] / out[f"patch_pass_s_{default}_threads"]
    return out


# ------------------------------------------------------------------------------------------ synthetic inputs


def synthetic_text(length: int, answer: int, vocab: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Token ids and roles laid out like a rendered chat: system, user, assistant markup, answer, markup.

    Args:
        length: total tokens (at least ``answer`` + 18).
        answer: answer tokens (the closing end-of-turn included).
        vocab: ids are drawn from [3, vocab) (0-2 are the special tokens).
        generator: random source.
    """
    system, template = 11, 3
    user = length - system - template - answer - 1
    if user < 1:
        raise ValueError(f"a {length}-token text cannot hold a {answer}-token answer")
    ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
    roles = [ROLE_SYSTEM] * system + [ROLE_USER] * user + [ROLE_TEMPLATE] * template + [ROLE_ANSWER] * answer
    return ids, roles + [ROLE_TEMPLATE]


def _frames(num_frames: Sequence[int], image_size: int, generator: torch.Generator) -> Tensor:
    return torch.randn(sum(num_frames), 3, image_size, image_size, generator=generator)  # [F, 3, H, W]


def sft_batch(num_frames: Sequence[int], text_len: int, image_size: int, vocab: int, seed: int = 0) -> dict:
    """A caption/SFT batch in the collate contract: ``text_len`` tokens per sample, a third of them answer."""
    gen = torch.Generator().manual_seed(seed)
    texts = [synthetic_text(text_len, text_len // 3, vocab, gen) for _ in num_frames]
    ids, mask, roles = pad_text([t[0] for t in texts], [t[1] for t in texts], pad_id=2)
    return {
        "frames": _frames(num_frames, image_size, gen),
        "num_frames": torch.tensor(list(num_frames)),
        "input_ids": ids,
        "attention_mask": mask,
        "roles": roles,
        "source": ["bench"] * len(num_frames),
        "key": [f"bench{i}" for i in range(len(num_frames))],
    }


def preference_batch(num_frames: Sequence[int], text_len: int, image_size: int, vocab: int, seed: int = 0) -> dict:
    """A preference batch in the collate contract: chosen and rejected of ``text_len`` tokens each."""
    gen = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {"frames": _frames(num_frames, image_size, gen), "num_frames": torch.tensor(list(num_frames))}
    for side in ("chosen", "rejected"):
        texts = [synthetic_text(text_len, text_len // 3, vocab, gen) for _ in num_frames]
        ids, mask, roles = pad_text([t[0] for t in texts], [t[1] for t in texts], pad_id=2)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_roles": roles})
    batch["source"] = ["bench"] * len(num_frames)
    batch["key"] = [f"bench{i}" for i in range(len(num_frames))]
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch's tensors to ``device``."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------- models


def build_module(size: str, loss: str, device: torch.device, gradient_checkpointing: bool = False,
                 lr_vision: float = 1e-5, **model_kwargs):
    """A configured FoveatedModule of the named size ("tiny" or "real") on ``device`` (``lr_vision`` 0: DINOv2
    frozen)."""
    from fovlm.module import FoveatedModule

    llm, vision = SIZES.get(size, (None, None))
    if llm is None:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    module = FoveatedModule(llm=llm, vision=vision, loss=loss, gradient_checkpointing=gradient_checkpointing,
                            lr_connector=1e-4, lr_vision=lr_vision, lr_llm=1e-5, **model_kwargs)
    module.configure_model()
    return module.to(device)


def make_optimizer(module, fused: bool | None) -> torch.optim.Optimizer:
    """AdamW over the module's parameter groups (fused kernel, foreach, or PyTorch's default choice)."""
    foreach = None if fused is None else not fused
    return torch.optim.AdamW(module.optimizer_param_groups(), fused=fused, foreach=foreach)


# ---------------------------------------------------------------------------------------------------- training


def ce_loss(module) -> Callable[[dict], Tensor]:
    """The module's own loss head on a batch (coarse_fine)."""
    return lambda batch: module.loss_head(module.model, batch, mode=module.mode, reference=module.reference).loss


def padded_ce_loss(module, encode_padding: bool) -> Callable[[dict], Tensor]:
    """The same CE with the naive padded layout (:func:`fovlm.bench.naive.padded_coarse_fine_logits`)."""

    def loss(batch: dict) -> Tensor:
        labels = shift_labels(batch["input_ids"], module.loss_head.score_mask(batch["roles"]))
        logits_mask, targets, _ = selected_targets(labels)
        logits = padded_coarse_fine_logits(module.model, batch["frames"], batch["num_frames"], batch["input_ids"],
                                           logits_mask, encode_padding=encode_padding)
        return token_nll(logits, targets).mean()

    return loss


def full_lm_head_ce_loss(module) -> Callable[[dict], Tensor]:
    """The same CE with the lm_head over every text position ([B, S, V]) and the scored rows picked after."""

    def loss(batch: dict) -> Tensor:
        labels = shift_labels(batch["input_ids"], module.loss_head.score_mask(batch["roles"]))
        logits_mask, targets, _ = selected_targets(labels)
        out = module.model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                           mode=module.mode, logits_mask=None)
        return token_nll(out.logits[logits_mask], targets).mean()

    return loss


def train_steps(env: Env, module, optimizer, loss_fn: Callable[[dict], Tensor], batch: dict, steps: int,
                warmup: int = 1) -> dict[str, float]:
    """Time full training steps (zero_grad, forward, backward, optimizer step) -> median seconds per part.

    ``step_cpu_s`` is the process CPU time of a step; against ``step_s`` x threads it shows how much of the
    cores the run had (on a shared machine).
    """
    module.train()
    parts: dict[str, list[float]] = {"forward_s": [], "backward_s": [], "optimizer_s": [], "step_s": [],
                                     "step_cpu_s": []}
    for i in range(warmup + steps):
        cpu0 = time.process_time()
        t0 = env.now()
        optimizer.zero_grad(set_to_none=True)
        with env.autocast():
            loss = loss_fn(batch)
        t1 = env.now()
        loss.backward()
        t2 = env.now()
        optimizer.step()
        t3 = env.now()
        cpu = time.process_time() - cpu0  # CPU time of this process's threads: shows how much of the wall it got
        if i >= warmup:
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, cpu), strict=True):
                parts[key].append(value)
    return {key: statistics.median(values) for key, values in parts.items()}


def step_flops(shape: flops.ModelShape, batch: dict, loss_head, dpo: bool = False, frozen_vision: bool = False) -> float:
    """Model FLOPs of one training step on ``batch`` (see :mod:`fovlm.bench.flops`)."""
    num_frames = batch["num_frames"].tolist()
    if dpo:
        lengths, scored = {}, 0
        for side in ("chosen", "rejected"):
            lengths[side] = batch[f"{side}_attention_mask"].sum(1).tolist()
            labels = shift_labels(batch[f"{side}_input_ids"], loss_head.score_mask(batch[f"{side}_roles"]))
            scored += int((labels != -100).sum())
        return flops.dpo_step(shape, num_frames, lengths["chosen"], lengths["rejected"], scored)
    labels = shift_labels(batch["input_ids"], loss_head.score_mask(batch["roles"]))
    return flops.train_step(shape, num_frames, batch["attention_mask"].sum(1).tolist(), int((labels != -100).sum()),
                            frozen_vision=frozen_vision)


def training_figures(timing: dict[str, float], batch_size: int, step_flop: float, peak: float) -> dict[str, float]:
    """Samples/s, achieved FLOP/s and its share of the measured matmul rate for one timed configuration."""
    return {
        **timing,
        "samples_per_s": batch_size / timing["step_s"],
        "model_flop_per_step": step_flop,
        "achieved_flop_per_s": step_flop / timing["step_s"],
        "fraction_of_matmul_peak": step_flop / timing["step_s"] / peak,
    }


# ---------------------------------------------------------------------------------------------- encoder parts


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


@torch.no_grad()
def generation_figures(env: Env, model, frames: int, prompt_len: int, new_tokens: int, image_size: int,
                       vocab: int) -> dict[str, float]:
    """Greedy decoding after an autoregressive visual pass: decode tokens/s and the whole answer's time."""
    from fovlm.model.generate import decode

    model.eval()
    gen = torch.Generator().manual_seed(2)
    clip = torch.randn(frames, 3, image_size, image_size, generator=gen).to(env.device)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=gen).to(env.device)

    def prefix() -> tuple[Any, Tensor]:
        pre = model.autoregressive_prefix(model.encode_patches(clip), torch.tensor([frames], device=env.device))
        hidden = model.continue_text(pre, prompt, torch.ones_like(prompt))
        return pre.past_key_values, model.lm_head(hidden[0, -1])

    with env.autocast():
        start = env.now()
        cache, last = prefix()
        prefix_s = env.now() - start
        decode(model.llm, cache, cache.get_seq_length(), last, stop_ids=[], max_new_tokens=4)  # warm-up
        cache, last = prefix()
        start = env.now()
        result = decode(model.llm, cache, cache.get_seq_length(), last, stop_ids=[], max_new_tokens=new_tokens)
        decode_s = env.now() - start
    tokens = len(result.token_ids)
    return {"frames": frames, "prompt_tokens": prompt_len, "new_tokens": tokens, "prefix_s": prefix_s,
            "decode_s": decode_s, "tokens_per_s": tokens / decode_s, "answer_s": prefix_s + decode_s}


@torch.no_grad()
def scoring_figures(env: Env, model, frames: int, options: int, image_size: int, vocab: int,
                    naive: bool = True) -> dict[str, float]:
    """3-mode scoring of one multiple-choice question: shared patch pass and prefixes vs the per-option way."""
    from fovlm.eval.questions import split_options
    from fovlm.eval.scoring import score_question, score_question_naive

    model.eval()
    gen = torch.Generator().manual_seed(3)
    prompt_ids, prompt_roles = synthetic_text(60, 6, vocab, gen)
    prompt_ids, prompt_roles = prompt_ids[:-7], prompt_roles[:-7]  # drop the answer and its closing markup
    rows = []
    for _ in range(options):
        answer = torch.randint(3, vocab, (6,), generator=gen).tolist()
        rows.append((prompt_ids + answer + [2, 198], prompt_roles + [ROLE_ANSWER] * 7 + [ROLE_TEMPLATE]))
    layout = split_options(rows, pad_id=2)
    clip = torch.randn(frames, 3, image_size, image_size, generator=gen).to(env.device)
    with env.autocast():
        shared_s = timed(env, lambda: score_question(model, clip, layout), 1)
        out = {"frames": frames, "options": options, "shared_s": shared_s}
        if naive:
            out["naive_per_option_s"] = timed(env, lambda: score_question_naive(model, clip, layout), 1, warmup=0)
            out["ratio"] = out["naive_per_option_s"] / shared_s
    return out


# ------------------------------------------------------------------------------------------------------ data


def _jpeg(seed: int, size: int) -> bytes:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)
    image = torch.nn.functional.interpolate(low[None].float(), size=(size, size), mode="bilinear")[0]
    array = image.clamp(0, 255).byte().permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_video_shard(path: Path, samples: int, frames: int, source_size: int) -> list[bytes]:
    """A shard of video samples (``frames`` JPEG frames of ``source_size`` px each); returns every JPEG."""
    jpegs = []
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"clip{i:05d}"
            members = {f"{key}.json": json.dumps({
                "source": "bench", "media": "video",
                "messages": [{"role": "user", "content": "What happens in this clip?"},
                             {"role": "assistant", "content": "A shape moves slowly across a textured background."}],
            }).encode()}
            for t in range(frames):
                jpeg = _jpeg(i * 1000 + t, source_size)
                jpegs.append(jpeg)
                members[f"{key}.{t:03d}.jpg"] = jpeg
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return jpegs


def data_figures(workdir: Path, tokenizer_dir: str, samples: int, frames: int, source_size: int,
                 batch_size: int, workers: Sequence[int]) -> dict[str, Any]:
    """SFTDataModule samples/s (per worker count) against the raw JPEG decode + resize rate in this process."""
    from fovlm.data.datamodules import SFTDataModule
    from fovlm.data.frames import decode_image

    shard = workdir / "bench-000000.tar"
    jpegs = write_video_shard(shard, samples, frames, source_size)
    start = time.perf_counter()
    for data in jpegs:
        decode_image(data)
    decode_s = time.perf_counter() - start
    out: dict[str, Any] = {"samples": samples, "frames_per_sample": frames, "source_px": source_size,
                           "raw_decode_frames_per_s": len(jpegs) / decode_s,
                           "raw_decode_samples_per_s": samples / decode_s, "datamodule": {}}
    for num_workers in workers:
        dm = SFTDataModule(train_shards=str(shard), tokenizer=tokenizer_dir, text_ratio=0.0, batch_size=batch_size,
                           num_workers=num_workers, shuffle_buffer=batch_size, index_cache=str(workdir / "index"))
        dm.setup("fit")
        start = time.perf_counter()
        loader = iter(dm.train_dataloader())
        first = len(next(loader)["key"])
        started = time.perf_counter()  # worker start-up and the first batch are reported apart from the rate
        rest = sum(len(batch["key"]) for batch in loader)
        elapsed = time.perf_counter() - started
        total = time.perf_counter() - start
        # A small shuffle buffer, so the first batch does not wait for the whole shard to be decoded.
        out["datamodule"][str(num_workers)] = {
            "samples": first + rest, "first_batch_s": started - start, "total_s": total, "steady_s": elapsed,
            "samples_per_s": (first + rest) / total, "steady_samples_per_s": rest / elapsed,
            "vs_raw_decode": (first + rest) / total / out["raw_decode_samples_per_s"]}
    return out


# ----------------------------------------------------------------------------------------------------- table


def flatten(result: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested result dict."""
    for key, value in result.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from flatten(value, name)
        else:
            yield name, value


def format_value(value: Any) -> str:
    """Compact human formatting for the printed table."""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)
