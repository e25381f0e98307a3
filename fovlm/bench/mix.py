"""Realistic length mixes: how much of the LLM input is padding, with and without packing, and what a step costs.

A uniform benchmark batch (every sample 8 frames, 64 text tokens) has no padding; real batches do. Each mix
below is a stated distribution of samples: a source's share, its frame counts (0: text-only; an image is
replicated to 8 frames, as :class:`fovlm.data.contract.FrameSettings` does) and its text lengths in tokens
(log-uniform in the range, a third of them answer). They mirror the recipe's stage-2 sources at their natural
sizes (docs/recipe.md#stage-2-supervised-fine-tuning: about 55% image and 45% video samples, plus 14% SmolTalk
text), the synthetic set's own samples (measured on its shards: 4-8 frames at 1 FPS, captions of 30-60 tokens,
questions of 30-130, chats of 30-60), and stage 3's RLAIF-V pairs.

The padding share counts, over many drawn batches, the positions of the R x L LLM input that hold no token, for
the two LLM passes of a coarse_fine step: the pass that writes the queries (each sample's visual tokens) and
the pass that reads the text (visual tokens and text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fovlm.bench.inputs import sft_batch_of
from fovlm.model.packing import padding


@dataclass(frozen=True)
class Source:
    """One kind of sample in a mix.

    Attributes:
        name: what it stands for.
        share: its share of the samples.
        frames: (fewest, most) frames, drawn uniformly; (0, 0) for text-only samples.
        text: (shortest, longest) text in tokens, drawn log-uniformly.
    """

    name: str
    share: float
    frames: tuple[int, int]
    text: tuple[int, int]


MIXES: dict[str, tuple[Source, ...]] = {
    "stage2": (
        Source("The Cauldron image questions (an image as 8 frames)", 0.47, (8, 8), (40, 400)),
        Source("OpenVid / WebVid captions", 0.20, (4, 30), (30, 120)),
        Source("VISTA / Vript / ShareGPT4Video / LLaVA-Video conversations", 0.19, (8, 64), (80, 600)),
        Source("SmolTalk chats (text only)", 0.14, (0, 0), (100, 1000)),
    ),
    "synthetic": (
        Source("captions", 0.45, (4, 8), (30, 60)),
        Source("questions", 0.40, (4, 8), (30, 130)),
        Source("chats (text only)", 0.15, (0, 0), (30, 60)),
    ),
    "stage3": (  # a pair's two sides are drawn on their own; the packed text pass holds both
        Source("RLAIF-V image preference pairs (an image as 8 frames)", 1.0, (8, 8), (30, 300)),
    ),
}


# Samples per batch of each mix: configs/stage2.yaml (8), the demo overlay (32), configs/stage3.yaml (4 pairs).
BATCH_SIZES = {"stage2": 8, "synthetic": 32, "stage3": 4}


def draw(mix: tuple[Source, ...], batch_size: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """A batch's (frames per sample, text tokens per sample) drawn from ``mix``."""
    shares = torch.tensor([s.share for s in mix])
    picks = torch.multinomial(shares, batch_size, replacement=True, generator=generator).tolist()
    frames, texts = [], []
    for i in picks:
        source = mix[i]
        frames.append(int(torch.randint(source.frames[0], source.frames[1] + 1, (1,), generator=generator)))
        low, high = math.log(source.text[0]), math.log(source.text[1])
        texts.append(round(math.exp(low + (high - low) * float(torch.rand(1, generator=generator)))))
    return frames, texts


def pass_lengths(mix_name: str, batch_size: int, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One drawn batch's tokens per sample in the query-writing pass (samples with frames) and in the text pass
    (for stage 3, ``batch_size`` pairs: both sides of a pair read the same visual tokens)."""
    frames, texts = draw(MIXES[mix_name], batch_size, generator)
    visual = torch.tensor(frames) * k
    text = visual + torch.tensor(texts)
    if mix_name == "stage3":
        text = torch.cat([text, visual + torch.tensor(draw(MIXES[mix_name], batch_size, generator)[1])])
    return {"query_pass": visual[visual > 0], "text_pass": text}


def padding_figures(mix_name: str, batch_size: int, k: int, settings: dict[str, int | None], batches: int = 200,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Padding share per LLM pass and packing setting, over ``batches`` batches drawn from a mix.

    Args:
        mix_name: a key of :data:`MIXES`.
        batch_size: samples per batch (for stage 3: pairs).
        k: visual tokens per frame.
        settings: label -> ``pack_tokens`` (None: one sample per row).
        batches: batches drawn.
        seed: random source.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = {label: {"query_pass": [0, 0], "text_pass": [0, 0]} for label in settings}  # [padding, positions]
    for _ in range(batches):
        for name, lengths in pass_lengths(mix_name, batch_size, k, gen).items():
            for label, pack_tokens in settings.items():
                padded, total = padding(lengths, pack_tokens)
                counts[label][name][0] += padded
                counts[label][name][1] += total
    return {label: {name: pad / total if total else 0.0 for name, (pad, total) in passes.items()}
            for label, passes in counts.items()}


def mixed_batch(mix_name: str, batch_size: int, image_size: int, vocab: int, seed: int = 0) -> dict:
    """One SFT batch in the collate contract drawn from a mix (the same for every configuration timed)."""
    frames, texts = draw(MIXES[mix_name], batch_size, torch.Generator().manual_seed(seed))
    return sft_batch_of(frames, texts, image_size, vocab, seed)
