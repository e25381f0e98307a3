"""Outputs of a seeded tiny FoveatedVLM on a fixed batch, stored so that later versions of the model can be held
to them (``data/one_query_outputs.pt``, written by ``python tests/model/stored_outputs.py OUT``).

The model is built from seeds (random tiny DINOv2 and Llama, query width 32, one query per frame); the batch
has a 3-frame clip with text, a text-only sample and a 2-frame clip with longer text. Stored per mode: the first
32 logits and the log-sum-exp of every real text position, and 6 greedily generated tokens for the first clip.
"""

from __future__ import annotations

import sys

import torch
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.model.generate import generate
from fovlm.model.loading import tiny_llm_config, tiny_vision_config
from fovlm.model.vlm import MODES, FoveatedVLM

SEED = 1234


def seeded_model() -> FoveatedVLM:
    """The tiny model the stored outputs come from (eval mode)."""
    torch.manual_seed(SEED)
    vision = Dinov2Model(tiny_vision_config())
    llm = LlamaForCausalLM(tiny_llm_config())
    return FoveatedVLM(vision, llm, query_dim=32).eval()


def fixed_batch() -> dict[str, torch.Tensor]:
    """Frames [5, 3, 224, 224], num_frames [3, 0, 2], right-padded text [3, 7]."""
    generator = torch.Generator().manual_seed(SEED + 1)
    frames = torch.randn(5, 3, 224, 224, generator=generator)
    input_ids = torch.randint(0, 49152, (3, 7), generator=generator)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    return {"frames": frames, "num_frames": torch.tensor([3, 0, 2]), "input_ids": input_ids * attention_mask,
            "attention_mask": attention_mask}


@torch.no_grad()
def compute_outputs(model: FoveatedVLM) -> dict[str, torch.Tensor]:
    """What is stored: per mode ``{mode}/head`` [N, 32] and ``{mode}/lse`` [N], and ``generated`` [6]."""
    batch = fixed_batch()
    mask = batch["attention_mask"].bool()
    outputs = {}
    for mode in MODES:
        logits = model(**batch, mode=mode, logits_mask=mask).logits  # [N, V]
        outputs[f"{mode}/head"] = logits[:, :32].clone()
        outputs[f"{mode}/lse"] = torch.logsumexp(logits, dim=-1)
    generation = generate(model, batch["frames"][:3], batch["input_ids"][0, :5], stop_ids=[], max_new_tokens=6)
    outputs["generated"] = torch.tensor(generation.token_ids)
    return outputs


if __name__ == "__main__":
    torch.save(compute_outputs(seeded_model()), sys.argv[1])
