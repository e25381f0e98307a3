"""Analytic model FLOPs of FoveatedVLM (conventional FLOPs: one multiply-add = 2 FLOPs).

Forward FLOPs, per piece (D DINO width, M DINO MLP width, N DINO tokens per frame, Dq query width, Dl LLM
width, Dkv LLM key/value width, Fl LLM MLP width, V vocabulary):

- DINO patch pass, per frame: patch embedding ``2 (N-1) (3 p^2) D``; per layer
  ``2 N (4 D^2 + 2 D M)`` (Q, K, V, O projections and the MLP) plus ``4 N^2 D`` (scores and weighted sum);
  every frame's K/V computed once.
- Query pass, per query token (k per frame and pass): ``2 Dq D`` (query input projection); per layer
  ``2 (2 D^2 + 2 D M) + 4 N D`` (Q and O projections, MLP, attention over the N cached keys); then
  ``2 D^2`` (output projection) and ``2 D Dl`` (connector).
- LLM pass over L new tokens attending to C keys each: per layer ``2 L (2 Dl^2 + 2 Dl Dkv + 3 Dl Fl)``
  plus ``4 L C Dl`` (C = L for a full pass; the causal half is not discounted, as SDPA computes it).
- Query head: ``2 Dl Dq`` per visual position of the coarse pass. lm_head: ``2 Dl V`` per scored row only.

A coarse_fine training sample with T frames of k tokens and S text tokens costs one patch pass per frame, two
query passes per query token (2 T k), an LLM pass over T k coarse tokens, the query head on them, an LLM pass
over T k + S tokens and the lm_head on its scored rows. Training = 3 x forward (backward costs twice the forward). A DPO step = policy
forward + backward (3x) + frozen reference model forward (1x) = 4x the pair forward, where the pair forward
shares the visual part and runs the LLM over both texts. Norms, activations, softmax and the loss are not
counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The widths that decide the FLOPs (see the module docstring for the symbols)."""

    dino_width: int
    dino_layers: int
    dino_mlp: int
    patch_size: int
    image_size: int
    query_dim: int
    llm_width: int
    llm_layers: int
    llm_kv_width: int
    llm_mlp: int
    vocab: int
    num_queries: int = 1

    @property
    def dino_tokens(self) -> int:
        """N: CLS + patches of one frame."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def of(cls, model) -> ModelShape:
        """Read the shape of a built FoveatedVLM."""
        vision = model.encoder.dino.config
        text = model.llm.config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            dino_width=vision.hidden_size,
            dino_layers=vision.num_hidden_layers,
            dino_mlp=int(vision.hidden_size * vision.mlp_ratio),
            patch_size=vision.patch_size,
            image_size=vision.image_size,
            query_dim=model.query_dim,
            llm_width=text.hidden_size,
            llm_layers=text.num_hidden_layers,
            llm_kv_width=kv_heads * head_dim,
            llm_mlp=text.intermediate_size,
            vocab=text.vocab_size,
            num_queries=getattr(model, "active_queries", 1),
        )


def patch_pass(s: ModelShape) -> float:
    """Forward FLOPs of the DINO patch pass over one frame."""
    n, d, m = s.dino_tokens, s.dino_width, s.dino_mlp
    embed = 2 * (n - 1) * 3 * s.patch_size**2 * d
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    return embed + s.dino_layers * per_layer


def query_pass(s: ModelShape) -> float:
    """Forward FLOPs of one query token's pass over its frame, connector included."""
    n, d, m = s.dino_tokens, s.dino_width, s.dino_mlp
    per_layer = 2 * (2 * d * d + 2 * d * m) + 4 * n * d
    return 2 * s.query_dim * d + s.dino_layers * per_layer + 2 * d * d + 2 * d * s.llm_width


def llm_pass(s: ModelShape, tokens: int, context: int | None = None) -> float:
    """Forward FLOPs of the LLM backbone over ``tokens`` new tokens attending to ``context`` keys each."""
    context = tokens if context is None else context
    dl = s.llm_width
    dense = 2 * tokens * (2 * dl * dl + 2 * dl * s.llm_kv_width + 3 * dl * s.llm_mlp)
    return s.llm_layers * (dense + 4 * tokens * context * dl)


def lm_head(s: ModelShape, rows: int) -> float:
    """Forward FLOPs of the lm_head on ``rows`` rows."""
    return 2 * rows * s.llm_width * s.vocab


def query_head(s: ModelShape, rows: int) -> float:
    """Forward FLOPs of the query head on ``rows`` visual positions."""
    return 2 * rows * s.llm_width * s.query_dim


def visual_forward(s: ModelShape, num_frames: Sequence[int], mode: str = "coarse_fine") -> float:
    """Forward FLOPs of the visual part of a batch (patch pass, query passes, coarse LLM pass, query head)."""
    frames, k = sum(num_frames), s.num_queries
    total = frames * (patch_pass(s) + k * query_pass(s))
    if mode == "coarse_fine":
        total += frames * k * query_pass(s) + query_head(s, frames * k)
        total += sum(llm_pass(s, t * k) for t in num_frames if t > 0)
    return total


def text_forward(s: ModelShape, num_frames: Sequence[int], text_lengths: Sequence[int], scored_rows: int) -> float:
    """Forward FLOPs of the LLM over [visual tokens ; text] per sample plus the lm_head on the scored rows."""
    k = s.num_queries
    return sum(llm_pass(s, t * k + n) for t, n in zip(num_frames, text_lengths, strict=True)) + lm_head(s, scored_rows)


def train_step(
    s: ModelShape, num_frames: Sequence[int], text_lengths: Sequence[int], scored_rows: int, mode: str = "coarse_fine",
    frozen_vision: bool = False,
) -> float:
    """Model FLOPs of one CE training step (forward + backward = 3 x forward).

    With ``frozen_vision`` (DINOv2 not trained) the patch pass runs forward only; everything else is still
    counted at 3 x forward (the query passes do need their input gradients, not the frozen layers' weight
    gradients, so this is an upper bound for them)."""
    total = 3 * (visual_forward(s, num_frames, mode) + text_forward(s, num_frames, text_lengths, scored_rows))
    return total - (2 * sum(num_frames) * patch_pass(s) if frozen_vision else 0.0)


def dpo_step(
    s: ModelShape,
    num_frames: Sequence[int],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    scored_rows: int,
    mode: str = "coarse_fine",
) -> float:
    """Model FLOPs of one DPO step: policy forward + backward (3x) and the reference model forward (1x).

    ``scored_rows`` counts the scored rows of both sides together.
    """
    pair = (
        visual_forward(s, num_frames, mode)
        + text_forward(s, num_frames, chosen_lengths, 0)
        + text_forward(s, num_frames, rejected_lengths, 0)
        + lm_head(s, scored_rows)
    )
    return 4 * pair


def autoregressive(s: ModelShape, frames: int, with_patch_pass: bool = True) -> float:
    """Forward FLOPs of the autoregressive visual pass of one clip (one cached LLM step of k tokens per frame)."""
    k = s.num_queries
    steps = sum(k * query_pass(s) + llm_pass(s, k, (t + 1) * k) + query_head(s, k) for t in range(frames))
    return steps + (frames * patch_pass(s) if with_patch_pass else 0.0)
