"""Where the queries look: the share of a query's attention that falls inside the answer's region.

For a question whose benchmark says where the answer is shown (``answer_region``: a box, or the places a spread
answer is read from, and the time from which it holds, see :mod:`fovlm.data.schema`), the attention share of a
query on a frame is the sum of its attention weights (last DINO layer, averaged over heads) on the patches whose
centres fall inside its target; the CLS key counts as outside. A box is every query's target; a spread answer's
places are shared out over a frame's queries as the look loss shares them (:func:`fovlm.losses.query_targets`,
by the model's largest budget K), and the queries with no place are not counted. A frame's share is the mean
over its counted queries, averaged over the frames taken at or after the region's start time. Measured for the
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
from fovlm.losses import box_patches, query_targets
from fovlm.model.encoder import PatchCache

# query_attention_maps' names for the queries of each mode.
KIND_OF_MODE = {"coarse_only": "coarse", "coarse_fine": "fine", "autoregressive": "autoregressive"}


def region_patches(box: Sequence[float], grid: int) -> Tensor:
    """bool [grid * grid] (row-major): the patches of a ``grid x grid`` patch grid whose centres lie in ``box``
    (x0, y0, x1, y1 in fractions of the frame; the lower bound inclusive, the upper exclusive)."""
    return box_patches(torch.tensor([list(box)], dtype=torch.float64), grid)[0]


def share_in_region(weights: Tensor, region: AnswerRegion, spread_over: int | None = None) -> Tensor:
    """Attention share inside ``region`` per frame: ``weights`` [T, h, k, N] (a frame's k queries, N = 1 CLS + G*G
    patches) -> [T], the mean over the queries that have a target of each one's share inside it. ``spread_over``:
    the K a spread answer's places are shared out by (default k)."""
    keys, k = weights.shape[-1], weights.shape[-2]
    grid = math.isqrt(keys - 1)
    if grid * grid != keys - 1:
        raise ValueError(f"{keys} keys is not 1 CLS + a square patch grid")
    inside = box_patches(torch.tensor(region.boxes, dtype=torch.float64), grid)[None].to(weights.device)  # [1, R, G*G]
    spread = torch.tensor([region.box is None], device=weights.device)
    valid = torch.ones(inside.shape[:2], dtype=torch.bool, device=weights.device)
    target, has_target = query_targets(inside, valid, spread, k, spread_over or k)  # [1, k, G*G], [1, k]
    per_query = (weights.float().mean(dim=1)[..., 1:] * target).sum(dim=-1)  # [T, k]
    return per_query[:, has_target[0]].mean(dim=-1)  # [T]


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
    maps = _last_layer_maps(model, frames, patches, head_ids, {KIND_OF_MODE[mode] for mode in modes})
    out = {}
    for mode in modes:
        shares = share_in_region(maps[KIND_OF_MODE[mode]], region, model.num_queries)  # [T]
        out[mode] = region_share(shares, times, region.start)
    return out


def _last_layer_maps(
    model, frames: Tensor, patches: PatchCache | None, head_ids: Tensor | None, kinds: set[str]
) -> dict[str, Tensor]:
    """The last DINO layer's attention [T, h, k, N] of each of a frame's k queries, for the ``kinds`` wanted of
    the coarse, fine and autoregressive queries; with ``head_ids`` [P] the LLM reads them before the frames."""
    if patches is None:
        patches = model.encode_patches(frames)
    num_frames = torch.tensor([frames.shape[0]], device=frames.device)
    text = head = None
    if head_ids is not None and len(head_ids):
        ids = head_ids.to(frames.device)[None]  # [1, P]
        head = (ids, torch.ones_like(ids))
        text = (*head, torch.tensor([ids.shape[1]], device=frames.device))
    weights = {}
    if kinds & {"coarse", "fine"}:
        visual = model.visual_tokens(patches, num_frames, "coarse_fine", return_attention=True, text=text)
        weights.update(coarse=visual.coarse_attention, fine=visual.fine_attention)
    if "autoregressive" in kinds:
        weights["autoregressive"] = model.autoregressive_prefix(
            patches, num_frames, return_attention=True, head=head).attention
    return {kind: per_layer[-1].float().cpu() for kind, per_layer in weights.items()}  # [T, h, k, N]


def uniform_share(region: AnswerRegion, grid: int) -> float:
    """The share of a query that attends to every key equally: patches inside the region's one box over
    1 + G*G keys."""
    if region.box is None:
        raise ValueError("a spread answer's uniform share depends on the query: give one box")
    return int(region_patches(region.box, grid).sum()) / (1 + grid * grid)


@torch.no_grad()
def save_region_sheet(model, question: Question, path: str | Path, patches: PatchCache | None = None) -> Path:
    """A PNG of where the coarse, fine and autoregressive queries look on the question's frames (last DINO
    layer), with the answer's region outlined on the frames it holds for; returns the path. ``patches``: the
    frames' patch pass when the caller already ran it."""
    if question.answer_region is None or question.answer_region.box is None:
        raise ValueError(f"question {question.key!r} has no one-box answer region to outline")
    device = next(model.parameters()).device
    maps = query_attention_maps(model, normalize(question.frames).to(device), patches)
    counted = frames_from(question.times, question.frames.shape[0], question.answer_region.start)
    sheet = attention_sheet(list(question.frames), maps, layer=-1, box=question.answer_region.box,
                            box_frames=counted.tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
