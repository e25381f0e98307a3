"""What the benchmark sections measure: configured modules and optimizers, synthetic batches, a JPEG shard.

Inputs are synthetic (random frames, token ids with the chat roles laid out as a rendered conversation would
have them): speed does not depend on their values.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fovlm.data.collate import pad_text
from fovlm.data.roles import ROLE_ANSWER, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER

SIZES = {"tiny": ("tiny", "tiny"), "real": ("smollm2", "dinov2-small-random")}


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


# --------------------------------------------------------------------------------------------------- batches


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
    return sft_batch_of(num_frames, [text_len] * len(num_frames), image_size, vocab, seed)


def sft_batch_of(num_frames: Sequence[int], text_lens: Sequence[int], image_size: int, vocab: int,
                 seed: int = 0) -> dict:
    """A caption/SFT batch in the collate contract with each sample's own text length (a third of it answer)."""
    gen = torch.Generator().manual_seed(seed)
    texts = [synthetic_text(n, n // 3, vocab, gen) for n in text_lens]
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


# ----------------------------------------------------------------------------------------------------- shard


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
