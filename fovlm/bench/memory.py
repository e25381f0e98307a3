"""``python -m fovlm.bench.memory``: where an SFT step's resident memory goes, one configured module per process.

Each configuration runs in a fresh child process (so nothing of another one stays resident): it builds the
module, times ``--steps`` training steps (zero_grad, forward, backward, fused AdamW step) on a uniform batch and
reports the resident set at each point, the peak of the whole process (``ru_maxrss``), and what the forward
keeps for backward: the bytes of every distinct storage autograd saves, by part of the model (patch pass,
query passes, LLM and lm_head). The figures: parameters + gradients + optimizer states + saved activations
against the peak show how much is allocator cache and temporaries.

Configurations: ``baseline`` (the module as ``FoveatedModule`` builds it) and variants that each change one
thing, named on the command line (see :data:`VARIANTS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch

VARIANTS: dict[str, str] = {
    "baseline": "the module as configured (the attention kernel chosen by device and dtype)",
    "sdpa_attention": "SDPA's kernel in the patch pass whatever the dtype",
    "matmul_attention": "the matmul attention kernel in the patch pass whatever the dtype",
    "gradient_checkpointing": "recompute the LLM layers and the patch pass in backward",
}


def rss() -> int:
    """This process's resident set size in bytes."""
    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def saved_bytes(model, tally: dict[str, int]) -> Iterator[None]:
    """Count every distinct storage autograd saves for backward, by the part of ``model`` that saved it
    (parameters, which autograd saves too, are not counted: they are resident anyway)."""
    phase = ["other"]
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def labelled(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            outer, phase[0] = phase[0], name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = outer
        return run

    parts = {"encode_patches": "patch pass", "read_frames": "query passes", "llm_hidden": "LLM",
             "text_logits": "lm_head"}
    originals = {name: getattr(model, name) for name in parts}
    for name, label in parts.items():
        setattr(model, name, labelled(label, originals[name]))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            tally[phase[0]] += storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
    finally:
        for name in parts:
            delattr(model, name)  # the instance attributes go; the class methods show through again


def probe(variant: str, size: str, precision: str, frames: int, batch_size: int, text: int, steps: int) -> dict:
    """One configuration in this process -> resident memory at each point and the saved bytes per part."""
    from fovlm.bench.inputs import build_module, make_optimizer, sft_batch
    from fovlm.bench.measure import Env, PeakRSS

    torch.manual_seed(0)
    out: dict[str, Any] = {"variant": variant, "rss_start": rss()}
    module = build_module(size, "answer_only", torch.device("cpu"),
                          gradient_checkpointing=variant == "gradient_checkpointing")
    if variant.endswith("_attention"):
        module.model.encoder.attention_kernel = variant.removesuffix("_attention")
    optimizer = make_optimizer(module, fused=True)
    params = [p for p in module.parameters() if p.requires_grad]
    out["trained_parameter_bytes"] = sum(p.numel() * p.element_size() for p in params)
    out["rss_built"] = rss()
    batch = sft_batch([frames] * batch_size, text, 224, module.model.llm.config.vocab_size)
    env = Env(torch.device("cpu"), precision)
    module.train()
    for step in range(steps):
        tally: dict[str, int] = defaultdict(int)
        with PeakRSS() as watch:
            optimizer.zero_grad(set_to_none=True)
            with env.autocast(), saved_bytes(module.model, tally):
                loss = module.loss_head(module.model, batch, mode=module.mode).loss
            out[f"rss_after_forward_{step}"] = rss()
            loss.backward()
            optimizer.step()
        out[f"rss_peak_step_{step}"] = watch.peak
        out[f"saved_bytes_{step}"] = dict(tally)
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovlm.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=["baseline"], help=f"any of {sorted(VARIANTS)}")
    parser.add_argument("--size", default="real", help="tiny or real (random DINOv2-small + SmolLM2-135M)")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast over fp32 weights)")
    parser.add_argument("--frames", type=int, default=8, help="frames per sample")
    parser.add_argument("--batch", type=int, default=2, help="samples per batch")
    parser.add_argument("--text", type=int, default=64, help="text tokens per sample")
    parser.add_argument("--steps", type=int, default=2, help="training steps (the optimizer states appear in the first)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of each child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; expected any of {sorted(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(probe(args.variants[0], args.size, args.precision, args.frames, args.batch, args.text,
                               args.steps)))
        return 0
    common = [f"--size={args.size}", f"--precision={args.precision}", f"--frames={args.frames}",
              f"--batch={args.batch}", f"--text={args.text}", f"--steps={args.steps}"]
    common += [f"--threads={args.threads}"] if args.threads else []
    for name in args.variants:
        done = subprocess.run([sys.executable, "-m", "fovlm.bench.memory", name, "--child", *common],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        report(json.loads(done.stdout.strip().splitlines()[-1]))
    return 0


def report(r: dict[str, Any]) -> None:
    """One configuration's figures, in GiB."""
    gib = 2**30
    saved = r[f"saved_bytes_{max(int(k.rsplit('_', 1)[1]) for k in r if k.startswith('saved_bytes_'))}"]
    parts = ", ".join(f"{name} {value / gib:.3f}" for name, value in sorted(saved.items()))
    print(f"{r['variant']}: peak RSS {r['ru_maxrss'] / gib:.2f} GiB ({r['ru_maxrss'] / 1e9:.2f} GB); built "
          f"{r['rss_built'] / gib:.2f}; trained parameters {r['trained_parameter_bytes'] / gib:.2f} (x4 with "
          f"gradients and AdamW states); per step peak "
          + " / ".join(f"{r[k] / gib:.2f}" for k in sorted(r) if k.startswith("rss_peak_step_"))
          + f"; saved for backward {sum(saved.values()) / gib:.3f} ({parts})")


if __name__ == "__main__":
    sys.exit(main())
