"""Monitors that look at one fixed sample during training: where the queries look, and a generated answer.

- ``AttentionMonitor``: the attention maps and entropies of the coarse (static) query and the fine (LLM-written)
  queries.
- ``SampleGeneration``: a greedy answer to the sample's first question, next to its correct answer.

Every rank runs them (a fully sharded model's parameters are gathered for them, which is a collective); only rank 0
writes what they log.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from fovlm.callbacks.common import (
    StepBoundary,
    log_scalars,
    logger_step,
    require_positive,
    tensorboard_writer,
)
from fovlm.model.sharding import gathered


class _RandomStatesKept:
    """Context manager: whatever runs inside leaves the Python, NumPy and torch CPU generators as it found them
    (building a loader iterator draws a seed from torch's generator, which would change the training run)."""

    def __enter__(self) -> _RandomStatesKept:
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


def _single_sample(batch: dict[str, Any], index: int) -> dict[str, Any]:
    """Sample ``index`` of a caption/SFT or preference batch: its frames [T, 3, H, W] and its text rows (CPU)."""
    num_frames = batch["num_frames"].cpu()
    start = int(num_frames[:index].sum())
    count = int(num_frames[index])
    sample = {"frames": batch["frames"][start : start + count].detach().cpu()}  # [T, 3, H, W]
    prefix = "chosen_" if "chosen_input_ids" in batch else ""
    mask = batch[f"{prefix}attention_mask"][index].bool().cpu()
    sample["input_ids"] = batch[f"{prefix}input_ids"][index].cpu()[mask]  # [S]
    sample["roles"] = batch[f"{prefix}roles"][index].cpu()[mask]  # [S]
    return sample


def _first_video_sample(batch: Any) -> dict[str, Any] | None:
    """The first sample with frames in a batch, or None."""
    if not isinstance(batch, dict) or "num_frames" not in batch:
        return None
    with_frames = (batch["num_frames"] > 0).nonzero()
    return _single_sample(batch, int(with_frames[0])) if len(with_frames) else None


class _FixedSample(StepBoundary):
    """Base of the callbacks that look at one fixed sample: the first video sample of the validation set when
    there is one, else the first video sample this process trains on. Fetching it leaves the random
    generators untouched, so monitoring never changes what is trained."""

    def __init__(self, every_n_steps: int) -> None:
        require_positive("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.sample: dict[str, Any] | None = None
        self._looked_at_val = False

    def _val_sample(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        with _RandomStatesKept():
            loader = datamodule.val_dataloader()
            if loader is None or isinstance(loader, (list, tuple)) and not loader:  # no validation set
                return None
            for batch in loader:
                # The hook a training batch goes through after reaching the device (frames uint8 -> normalised).
                sample = _first_video_sample(datamodule.on_after_batch_transfer(batch, 0))
                if sample is not None:
                    return sample
        return None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.ended_step(trainer) or trainer.global_step % self.every_n_steps != 0:
            if self.sample is None and self._looked_at_val:
                self.sample = _first_video_sample(batch)
            return
        if self.sample is None and not self._looked_at_val:
            self._looked_at_val = True
            self.sample = self._val_sample(trainer)
        if self.sample is None:
            self.sample = _first_video_sample(batch)
        # Every rank looks or none does: under sharding, gathering the parameters is a collective.
        if not trainer.strategy.reduce_boolean_decision(self.sample is not None, all=True):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), _RandomStatesKept(), gathered(pl_module.model):
                self.observe(trainer, pl_module, self.sample)
        finally:
            pl_module.train(was_training)

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sample: dict[str, Any]) -> None:
        raise NotImplementedError


class AttentionMonitor(_FixedSample):
    """Every ``every_n_steps`` steps: where the coarse (static) query and the fine (LLM-written) queries look, on a
    fixed sample, as a TensorBoard image ``attention/maps`` (one row per query kind, one column per frame, heads
    and layers averaged), and the mean attention entropy of each kind (``attention/entropy_coarse``,
    ``attention/entropy_fine``, nats over the CLS token and the patches; uniform attention is ln(keys)).

    The maps are those of :func:`fovlm.eval.attention.query_attention_maps` for the kinds "coarse" and "fine".

    Args:
        every_n_steps: optimizer steps between two looks.
        num_frames: frames drawn (the first ones of the sample).
    """

    def __init__(self, every_n_steps: int = 500, num_frames: int = 4) -> None:
        super().__init__(every_n_steps)
        require_positive("num_frames", num_frames)
        self.num_frames = num_frames

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sample: dict[str, Any]) -> None:
        from fovlm.eval.attention import attention_entropy, attention_sheet, query_attention_maps

        model = pl_module.model
        device = next(model.parameters()).device
        # kind -> [T, L, h, K] on the CPU
        maps = query_attention_maps(model, sample["frames"].to(device), kinds=("coarse", "fine"))
        log_scalars(
            trainer,
            {f"attention/entropy_{kind}": float(attention_entropy(w).mean()) for kind, w in maps.items()},
        )
        writer = tensorboard_writer(trainer)
        if writer is not None:
            shown = min(self.num_frames, len(sample["frames"]))
            sheet = attention_sheet(
                list(sample["frames"][:shown]), {k: w[:shown] for k, w in maps.items()}, layer=None, cell=128
            )
            writer.add_image("attention/maps", np.asarray(sheet), logger_step(trainer), dataformats="HWC")


class SampleGeneration(_FixedSample):
    """Every ``every_n_steps`` steps: a greedy answer to a fixed sample's first question, generated with the
    autoregressive visual pass (``fovlm.model.generate.generate``), as TensorBoard text ``samples/generation``
    together with the prompt and the correct answer.

    Args:
        every_n_steps: optimizer steps between two generations.
        max_new_tokens: most tokens generated.
    """

    def __init__(self, every_n_steps: int = 1000, max_new_tokens: int = 48) -> None:
        super().__init__(every_n_steps)
        require_positive("max_new_tokens", max_new_tokens)
        self.max_new_tokens = max_new_tokens

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sample: dict[str, Any]) -> None:
        from fovlm.data.roles import ROLE_ANSWER, question_end
        from fovlm.model.generate import generate

        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        answer = (sample["roles"] == ROLE_ANSWER).nonzero()
        if tokenizer is None or not len(answer):
            return
        start = int(answer[0])
        end = start
        while end < len(sample["roles"]) and int(sample["roles"][end]) == ROLE_ANSWER:
            end += 1
        prompt_ids = sample["input_ids"][:start]  # [P]: up to and including "<|im_start|>assistant\n"
        reference = sample["input_ids"][start:end]  # the answer and its <|im_end|>
        model = pl_module.model
        device = next(model.parameters()).device
        stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        question_len = int(question_end(sample["roles"][None])[0]) if model.question_first else 0
        result = generate(
            model, sample["frames"].to(device), prompt_ids.to(device), stop_ids, max_new_tokens=self.max_new_tokens,
            question_len=min(question_len, start),
        )
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        prompt = tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=False)
        text = (
            f"**frames:** {len(sample['frames'])}  \n"
            f"**prompt:** `{prompt.strip()}`  \n"
            f"**correct answer:** {tokenizer.decode(reference.tolist(), skip_special_tokens=True).strip()}  \n"
            f"**generated:** {tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()}"
        )
        writer.add_text("samples/generation", text, logger_step(trainer))
