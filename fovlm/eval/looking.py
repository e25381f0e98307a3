"""Where the queries look: the share of a query's attention that falls inside the answer's region.

For a question whose benchmark says where the answer is shown (``answer_region``: a box and the time from which
it holds, see :mod:`fovlm.data.schema`), the attention share of a query on a frame is the sum of its attention
weights (last DINO layer, averaged over heads) on the patches whose centres fall inside the box; the CLS key
counts as outside. It is averaged over the frames taken at or after the region's start time. Measured for the
coarse (static) query (``coarse_only``), the fine queries the LLM writes in the coarse -> fine pass
(``coarse_fine``) and those of true frame-by-frame inference (``autoregressive``): a model that looks where the
answer is gives its LLM-written queries a higher share than the coarse one. A query spread evenly over the keys
has a share of (patches inside) / (1 + patches). A question-first model's LLM-written queries are those it writes
after reading the question (``head_ids``), as when it answers. A long video's shares come from the same stream
that scores it (:func:`fovlm.eval.stream_scoring.score_stream`, per frame), averaged by :func:`region_share`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from fovlm.data.frames import normalize
from fovlm.data.regions import frames_from
from fovlm.data.schema import AnswerRegion
from fovlm.eval.attention import attention_sheet, query_attention_maps
from fovlm.eval.questions import Question
from fovlm.losses import box_patches
from fovlm.model.encoder import PatchCache

# query_attention_maps' names for the queries of each mode.
KIND_OF_MODE = {"coarse_only": "coarse", "coarse_fine": "fine", "autoregressive": "autoregressive"}


def region_patches(box: Sequence[float], grid: int) -> Tensor:
    """bool [grid * grid] (row-major): the patches of a ``grid x grid`` patch grid whose centres lie in ``box``
    (x0, y0, x1, y1 in fractions of the frame; the lower bound inclusive, the upper exclusive)."""
    return box_patches(torch.tensor([list(box)], dtype=torch.float64), grid)[0]


def share_in_region(weights: Tensor, box: Sequence[float]) -> Tensor:
    """Attention share inside ``box`` per frame: ``weights`` [T, h, K] (K = 1 CLS + G*G patches) -> [T]."""
    keys = weights.shape[-1]
    grid = math.isqrt(keys - 1)
    if grid * grid != keys - 1:
        raise ValueError(f"{keys} keys is not 1 CLS + a square patch grid")
    inside = region_patches(box, grid).to(weights.device)
    return weights.float().mean(dim=-2)[:, 1:][:, inside].sum(dim=-1)  # [T]


def region_share(shares: Tensor, times: Sequence[float] | None, start: float) -> float:
    """The mean of per-frame shares [T] over the frames taken at or after ``start`` (nan when there is none)."""
    counted = frames_from(times, shares.shape[0], start)
    return float(shares[counted].mean()) if counted.any() else math.nan


@torch.no_grad()
def attention_shares(
    model, frames: Tensor, region: AnswerRegion, times: Sequence[float] | None, modes: Sequence[str],
    patches: PatchCache | None = None, head_ids: Tensor | None = None,
) -> dict[str, float]:
    """Mean attention share inside ``region`` of each mode's queries over the frames from the region's start.

    Args:
        model: a FoveatedVLM in eval mode.
        frames: ImageNet-normalised frames [T, 3, H, W] on the model's device.
        region: where the answer is shown.
        times: the frames' timestamps in seconds (None: every frame counts).
        modes: any of "coarse_only", "coarse_fine", "autoregressive".
        patches: the frames' patch pass when the caller already ran it (e.g. for scoring).
        head_ids: long [P], text the LLM reads before the frames (a question-first model's system and user turns);
            the fine and autoregressive queries are then written after it. None: the frames come first.

    Returns:
        mode -> share (nan when no frame is taken after the region's start).
    """
    if head_ids is None or not len(head_ids):
        maps = {kind: weights[:, -1] for kind, weights in query_attention_maps(model, frames, patches).items()}
    else:
        maps = _maps_after_head(model, frames, patches, head_ids)  # kind -> [T, h, K]
    out = {}
    for mode in modes:
        shares = share_in_region(maps[KIND_OF_MODE[mode]], region.box)  # last DINO layer: [T]
        out[mode] = region_share(shares, times, region.start)
    return out


def _maps_after_head(model, frames: Tensor, patches: PatchCache | None, head_ids: Tensor) -> dict[str, Tensor]:
    """The last DINO layer's attention [T, h, K] (a frame's k queries averaged) of the coarse, fine and
    autoregressive queries, the LLM reading ``head_ids`` [P] before the frames."""
    if patches is None:
        patches = model.encode_patches(frames)
    num_frames = torch.tensor([frames.shape[0]], device=frames.device)
    ids = head_ids.to(frames.device)[None]  # [1, P]
    ones = torch.ones_like(ids)
    text = (ids, ones, torch.tensor([ids.shape[1]], device=frames.device))
    visual = model.visual_tokens(patches, num_frames, "coarse_fine", return_attention=True, text=text)
    prefix = model.autoregressive_prefix(patches, num_frames, return_attention=True, head=(ids, ones))
    weights = {"coarse": visual.coarse_attention, "fine": visual.fine_attention, "autoregressive": prefix.attention}
    return {kind: per_layer[-1].mean(2).float().cpu() for kind, per_layer in weights.items()}  # [T, h, K]


def uniform_share(region: AnswerRegion, grid: int) -> float:
    """The share of a query that attends to every key equally: patches inside over 1 + G*G keys."""
    return int(region_patches(region.box, grid).sum()) / (1 + grid * grid)


@torch.no_grad()
def save_region_sheet(model, question: Question, path: str | Path, patches: PatchCache | None = None) -> Path:
    """A PNG of where the coarse, fine and autoregressive queries look on the question's frames (last DINO
    layer), with the answer's region outlined on the frames it holds for; returns the path. ``patches``: the
    frames' patch pass when the caller already ran it."""
    if question.answer_region is None:
        raise ValueError(f"question {question.key!r} has no answer region")
    device = next(model.parameters()).device
    maps = query_attention_maps(model, normalize(question.frames).to(device), patches)
    counted = frames_from(question.times, question.frames.shape[0], question.answer_region.start)
    sheet = attention_sheet(list(question.frames), maps, layer=-1, box=question.answer_region.box,
                            box_frames=counted.tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
