"""Per-sample encoding (shard members -> frames + token ids + roles) and batch collation.

Batches are exactly the contract's dicts (see :func:`collate`): every real frame of the batch concatenated
in sample order (``[F, 3, H, W]``, ImageNet-normalised, no padded frames), the per-sample frame counts,
right-padded text with its attention mask and roles. Which of a batch's samples are read together, and the
optional frame budget per batch, are decided by the epoch plan (:mod:`fovlm.data.plan`), since it knows every
sample's frame count before reading it.

Encoding checks the text first and decodes frames only for samples that have a usable text, so a bad
sample costs no image decoding. Frames stay uint8 through the loader workers (4x less to copy between
processes, and to the GPU) and are normalised at the last moment by :func:`normalize_frames`: after the
transfer to the device under Lightning (the DataModules' ``on_after_batch_transfer``), or by the loader
itself otherwise. :func:`collate` normalises directly unless told not to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fovlm.data.chat import SYSTEM_PROMPT, ChatError, encode_preference, encode_sample
from fovlm.data.contract import FRAME_SETTINGS, FrameSettings
from fovlm.data.frames import normalize as normalize_uint8
from fovlm.data.frames import sample_frames
from fovlm.data.regions import collate_regions, region_fields
from fovlm.data.roles import ROLE_PAD
from fovlm.data.schema import parse_sample
from fovlm.data.stream import SkipSample


@dataclass
class SampleEncoder:
    """``(key, members) -> encoded sample``; raises with a ``reason`` for samples to skip.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        max_length: text tokens kept per sequence (longer ones are truncated and counted).
        preference: encode preference pairs (chosen + rejected) instead of SFT / caption samples.
        frames: frame size, frames per video and image replication.
        system_prompt: the system turn for samples that carry none.
    """

    tokenizer: Any
    max_length: int
    preference: bool = False
    frames: FrameSettings = FRAME_SETTINGS
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
        settings = self.frames
        out["frames"] = sample_frames(  # uint8 [T, 3, size, size] or None (text)
            members, sample.media, settings.frame_size, settings.max_frames, settings.image_frames
        )
        if not self.preference and out["frames"] is not None:  # where the answer is shown, for the look loss
            out.update(region_fields(sample.answer_region, members, sample.media, out["frames"].shape[0],
                                     settings.max_frames, sample.duration))
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


def collate(
    samples: Sequence[dict[str, Any]],
    pad_id: int,
    preference: bool = False,
    frame_size: int = FRAME_SETTINGS.frame_size,
    normalize: bool = True,
) -> dict[str, Any]:
    """A batch of encoded samples: frames [F,3,H,W], num_frames [B], the text, and source and key (lists of B
    strings).

    The text of a caption / SFT batch is input_ids / attention_mask / roles [B,S]; a preference batch
    (``preference``) has chosen_* and rejected_* instead, each side padded to its own longest sequence. A caption
    / SFT batch with a sample that says where its answer is shown also has ``region_box`` / ``region_spread`` /
    ``region_frames`` (:func:`fovlm.data.regions.collate_regions`).
    ``frame_size`` shapes the empty frame stack of a text-only batch; ``normalize=False`` leaves the frames
    uint8 (see :func:`normalize_frames`).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    frames, num_frames = _frames(samples, frame_size, normalize)
    batch: dict[str, Any] = {"frames": frames, "num_frames": num_frames}
    for prefix in ("chosen_", "rejected_") if preference else ("",):
        ids, mask, roles = pad_text(
            [s[f"{prefix}input_ids"] for s in samples], [s[f"{prefix}roles"] for s in samples], pad_id
        )
        batch.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}roles": roles})
    if not preference:
        batch.update(collate_regions(samples))  # region_box [B, R, 4], region_spread [B], region_frames [F]
    batch["source"] = [s["source"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    return batch


@dataclass
class Collator:
    """A picklable collate function for the loader workers.

    Args:
        pad_id: the tokenizer's padding token id.
        frames: the frame settings (the frame size of text-only batches).
        preference: collate preference pairs instead of caption / SFT samples.
        normalize: normalise the frames (else they stay uint8, see :func:`normalize_frames`).
    """

    pad_id: int
    frames: FrameSettings = FRAME_SETTINGS
    preference: bool = False
    normalize: bool = True

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_id, self.preference, self.frames.frame_size, self.normalize)
