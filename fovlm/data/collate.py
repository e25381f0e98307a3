"""Per-sample encoding (shard members -> frames + token ids + roles) and batch collation.

Batches are exactly the contract's dicts (see ``collate_sft`` / ``collate_preference``): every real frame
of the batch concatenated in sample order (``[F, 3, H, W]``, ImageNet-normalised, no padded frames), the
per-sample frame counts, right-padded text with its attention mask and roles. Which of a batch's samples
are read together, and the optional frame budget per batch, are decided by the epoch plan
(:mod:`fovlm.data.pipeline`), since it knows every sample's frame count before reading it.

Encoding checks the text first and decodes frames only for samples that have a usable text, so a bad
sample costs no image decoding. Frames stay uint8 through the loader workers (4x less to copy between
processes, and to the GPU) and are normalised at the last moment by :func:`normalize_frames`: after the
transfer to the device under Lightning (the DataModules' ``on_after_batch_transfer``), or by the loader
itself otherwise. ``collate_sft`` / ``collate_preference`` normalise directly unless told not to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fovlm.data.chat import SYSTEM_PROMPT, ChatError, encode_preference, encode_sample
from fovlm.data.frames import DEFAULT_FRAME_SIZE, DEFAULT_IMAGE_FRAMES, sample_frames
from fovlm.data.frames import normalize as normalize_uint8
from fovlm.data.pipeline import SkipSample
from fovlm.data.schema import parse_sample
from fovlm.losses import ROLE_PAD


@dataclass
class SampleEncoder:
    """``(key, members) -> encoded sample``; raises with a ``reason`` for samples to skip.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        max_length: text tokens kept per sequence (longer ones are truncated and counted).
        preference: encode preference pairs (chosen + rejected) instead of SFT / caption samples.
        frame_size: frames are resized to cover and centre-cropped to ``frame_size`` squared.
        max_frames: at most this many frames per video (uniformly thinned beyond).
        image_frames: a single image is replicated to this many frames.
        system_prompt: the system turn for samples that carry none.
    """

    tokenizer: Any
    max_length: int
    preference: bool = False
    frame_size: int = DEFAULT_FRAME_SIZE
    max_frames: int = 64
    image_frames: int = DEFAULT_IMAGE_FRAMES
    system_prompt: str = SYSTEM_PROMPT

    def __call__(self, key: str, members: dict[str, bytes]) -> dict[str, Any]:
        if "json" not in members:
            raise SkipSample(
                "missing_json", f"sample {key!r} has no KEY.json member (members: {sorted(members)})"
            )
        sample = parse_sample(members["json"], key, list(members), members.get("txt"))
        if sample.is_preference != self.preference:
            kind = "a preference pair" if sample.is_preference else "not a preference pair"
            raise SkipSample("wrong_kind", f"sample {key!r} is {kind}, which this loader does not train on")
        out: dict[str, Any] = {"key": key, "source": sample.source}
        try:
            if self.preference:
                chosen, rejected = encode_preference(
                    self.tokenizer, sample, self.max_length, self.system_prompt
                )
                out["chosen_input_ids"], out["chosen_roles"] = chosen.input_ids, chosen.roles
                out["rejected_input_ids"], out["rejected_roles"] = rejected.input_ids, rejected.roles
                out["truncated"] = chosen.truncated or rejected.truncated
            else:
                encoded = encode_sample(self.tokenizer, sample, self.max_length, self.system_prompt)
                out["input_ids"], out["roles"] = encoded.input_ids, encoded.roles
                out["truncated"] = encoded.truncated
        except ChatError as err:
            raise SkipSample(err.reason, f"sample {key!r}: {err}") from err
        frames = sample_frames(members, sample.media, self.frame_size, self.max_frames, self.image_frames)
        out["frames"] = frames  # uint8 [T, 3, size, size] or None (text)
        return out


def _frames(
    samples: Sequence[dict[str, Any]], frame_size: int, normal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    stacks = [s["frames"] for s in samples if s.get("frames") is not None]
    num_frames = torch.tensor(
        [0 if s.get("frames") is None else s["frames"].shape[0] for s in samples], dtype=torch.long
    )  # [B]
    if stacks:
        frames = torch.cat(stacks)  # [F, 3, H, W] uint8
    else:
        frames = torch.zeros(0, 3, frame_size, frame_size, dtype=torch.uint8)  # [0, 3, H, W]
    return (normalize_uint8(frames) if normal else frames), num_frames


def normalize_frames(batch: dict[str, Any]) -> dict[str, Any]:
    """Turn a batch's uint8 frames into ImageNet-normalised float32 (on their device); idempotent."""
    frames = batch.get("frames")
    if isinstance(frames, torch.Tensor) and frames.dtype == torch.uint8:
        batch["frames"] = normalize_uint8(frames)  # [F, 3, H, W] float32
    return batch


def pad_text(
    sequences: Sequence[Sequence[int]], roles: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ``(input_ids, attention_mask, roles)``, each long [B, S]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, S]
    role = torch.full((len(sequences), width), ROLE_PAD, dtype=torch.long)  # [B, S]
    for i, (seq, rs) in enumerate(zip(sequences, roles, strict=True)):
        if len(seq) != len(rs):
            raise ValueError(f"sample {i}: {len(seq)} token ids but {len(rs)} roles")
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        role[i, : len(seq)] = torch.as_tensor(rs, dtype=torch.long)
    return ids, mask, role


def collate_sft(
    samples: Sequence[dict[str, Any]],
    pad_id: int,
    frame_size: int = DEFAULT_FRAME_SIZE,
    normalize: bool = True,
) -> dict[str, Any]:
    """Caption / SFT batch: frames [F,3,H,W], num_frames [B], input_ids / attention_mask / roles [B,S],
    source and key (lists of B strings). ``normalize=False`` leaves the frames uint8 (see
    :func:`normalize_frames`)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    frames, num_frames = _frames(samples, frame_size, normalize)
    ids, mask, roles = pad_text([s["input_ids"] for s in samples], [s["roles"] for s in samples], pad_id)
    return {
        "frames": frames,
        "num_frames": num_frames,
        "input_ids": ids,
        "attention_mask": mask,
        "roles": roles,
        "source": [s["source"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def collate_preference(
    samples: Sequence[dict[str, Any]],
    pad_id: int,
    frame_size: int = DEFAULT_FRAME_SIZE,
    normalize: bool = True,
) -> dict[str, Any]:
    """Preference batch: frames, num_frames, source, key, and chosen_* / rejected_* (input_ids,
    attention_mask, roles), each side padded to its own longest sequence."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    frames, num_frames = _frames(samples, frame_size, normalize)
    batch: dict[str, Any] = {"frames": frames, "num_frames": num_frames}
    for side in ("chosen", "rejected"):
        ids, mask, roles = pad_text(
            [s[f"{side}_input_ids"] for s in samples], [s[f"{side}_roles"] for s in samples], pad_id
        )
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_roles": roles})
    batch["source"] = [s["source"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    return batch


@dataclass
class Collator:
    """A picklable collate function for the loader workers."""

    pad_id: int
    frame_size: int = DEFAULT_FRAME_SIZE
    preference: bool = False
    normalize: bool = True

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.preference:
            return collate_preference(samples, self.pad_id, self.frame_size, self.normalize)
        return collate_sft(samples, self.pad_id, self.frame_size, self.normalize)
