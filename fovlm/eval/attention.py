"""Attention maps of the foveated query over a frame's 16x16 patch grid, drawn as PNG overlays.

The deep query attends, in every DINO layer and head, to the frame's CLS token plus its patches
(257 keys at 224 px). This module turns such weights into a patch-grid heatmap (CLS dropped, heads
averaged, one layer or the mean over layers), blends it over the frame, and lays out several frames and
query kinds as one labelled PNG. The kinds (:data:`KINDS`) are "coarse" (the static query ``q_static``, the
same on every frame), "fine" (the queries the LLM writes from the coarse tokens) and "autoregressive" (the
queries written frame by frame at inference). Entropy over the keys is provided too: a uniform query has
entropy ln(257) ~ 5.549, a foveating one clearly less.

Everything here is a pure function of tensors/images except :func:`save_attention_png`, which writes the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# ImageNet statistics: frames reach the model normalised with them, so drawing undoes it.
from fovlm.data.contract import IMAGENET_MEAN, IMAGENET_STD

# The query kinds whose attention :func:`query_attention_maps` returns, in its order.
KINDS = ("coarse", "fine", "autoregressive")

# Anchor colours of a dark-to-bright heat scale (black, purple, red, orange, pale yellow), interpolated linearly.
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)


def attention_entropy(weights: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension of attention weights, e.g. [..., 257] -> [...]."""
    probs = weights.float().clamp_min(eps)
    return -(probs * probs.log()).sum(dim=-1)


def patch_grid(weights: torch.Tensor, layer: int | None = -1) -> torch.Tensor:
    """Reduce one query's attention weights on one frame to a [G, G] map over the patches.

    Args:
        weights: [K] or [H, K] or [L, H, K] weights over K = 1 + G*G keys (CLS first, then patches row-major).
        layer: which layer of an [L, H, K] input to draw; ``None`` averages the layers.

    Returns:
        [G, G] float32 map; the CLS weight is dropped and the patch weights are renormalised to sum to 1, so
        maps of different layers and queries share a scale.
    """
    w = weights.detach().float()
    if w.dim() == 3:
        w = w.mean(dim=0) if layer is None else w[layer]
    if w.dim() == 2:
        w = w.mean(dim=0)  # heads averaged
    if w.dim() != 1:
        raise ValueError(f"attention weights must be [K], [H, K] or [L, H, K]; got shape {tuple(weights.shape)}")
    grid = math.isqrt(w.numel() - 1)
    if grid * grid != w.numel() - 1:
        raise ValueError(f"{w.numel()} keys is not 1 CLS + a square patch grid")
    patches = w[1:]
    patches = patches / patches.sum().clamp_min(1e-12)
    return patches.view(grid, grid)  # [G, G]


def frame_to_image(frame: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image, a uint8 [H, W, 3] array, a uint8 [3, H, W] tensor or an
    ImageNet-normalised float [3, H, W] tensor."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"array frames must be uint8 [H, W, 3]; got {frame.dtype} {frame.shape}")
        return Image.fromarray(frame)
    if frame.dim() != 3 or frame.shape[0] != 3:
        raise ValueError(f"tensor frames must be [3, H, W]; got {tuple(frame.shape)}")
    if frame.dtype == torch.uint8:  # decoded, not yet normalised (fovlm.data.frames)
        return Image.fromarray(frame.detach().cpu().permute(1, 2, 0).contiguous().numpy())
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (frame.detach().float().cpu() * std + mean).clamp(0, 1)  # [3, H, W] in [0, 1]
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB colours (shape + [3]) on the heat scale."""
    v = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (v - low)[..., None]
    rgb = _HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay(frame: torch.Tensor | np.ndarray | Image.Image, grid: torch.Tensor, alpha: float = 0.65) -> Image.Image:
    """Blend a [G, G] patch map (scaled to its own maximum) over the frame; each patch becomes a solid cell.

    A cell's opacity grows with its weight (``alpha`` at the maximum), so the frame stays visible where the
    query did not look. Cells are drawn with nearest-neighbour upsampling so that what is shown is exactly the
    patch the query read, not an interpolation across patch borders.
    """
    image = frame_to_image(frame).convert("RGBA")
    values = grid.detach().float().cpu().numpy()
    values = values / max(float(values.max()), 1e-12)
    rgba = np.concatenate([heat_colours(values), (255 * alpha * values).round().astype(np.uint8)[..., None]], -1)
    heat = Image.fromarray(rgba).resize(image.size, Image.NEAREST)
    return Image.alpha_composite(image, heat).convert("RGB")


def attention_sheet(
    frames: Sequence[torch.Tensor | np.ndarray | Image.Image],
    maps: Mapping[str, torch.Tensor],
    layer: int | None = -1,
    cell: int = 160,
    alpha: float = 0.65,
    box: Sequence[float] | None = None,
    box_frames: Sequence[bool] | None = None,
) -> Image.Image:
    """One image with a row per query kind and a column per frame, each cell the overlay of that frame.

    Args:
        frames: T frames (normalised [3, H, W] tensors, uint8 arrays or PIL images).
        maps: query kind (e.g. "coarse", "fine", "autoregressive") -> weights [T, K], [T, H, K] or [T, L, H, K].
        layer: layer drawn from [T, L, H, K] weights; ``None`` averages layers.
        cell: side of each drawn cell in pixels.
        alpha: heatmap opacity.
        box: a region (x0, y0, x1, y1 in fractions of the frame) outlined on the frames ``box_frames`` marks
            (every frame when None), e.g. where the answer is shown.
    """
    if not maps:
        raise ValueError("no attention maps to draw")
    num_frames = len(frames)
    for kind, weights in maps.items():
        if weights.shape[0] != num_frames:
            raise ValueError(f"{kind!r} maps cover {weights.shape[0]} frames, expected {num_frames}")
    label_w, title_h = 110, 18
    sheet = Image.new("RGB", (label_w + num_frames * cell, title_h + len(maps) * (cell + title_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for t in range(num_frames):
        draw.text((label_w + t * cell + 4, 2), f"frame {t}", fill="black")
    for row, (kind, weights) in enumerate(maps.items()):
        top = title_h + row * (cell + title_h)
        entropies = []
        for t in range(num_frames):
            grid = patch_grid(weights[t], layer=layer)
            tile = overlay(frames[t], grid, alpha=alpha).resize((cell, cell), Image.BILINEAR)
            if box is not None and (box_frames is None or box_frames[t]):
                x0, y0, x1, y1 = (round(v * (cell - 1)) for v in box)
                ImageDraw.Draw(tile).rectangle((x0, y0, x1, y1), outline=(0, 230, 255), width=2)
            sheet.paste(tile, (label_w + t * cell, top))
            entropies.append(float(attention_entropy(grid.flatten())))
        uniform = math.log(patch_grid(weights[0], layer=layer).numel())
        draw.text((4, top + 4), kind, fill="black")
        draw.text((4, top + 20), f"H={np.mean(entropies):.2f}", fill="black")
        draw.text((4, top + 36), f"(uniform {uniform:.2f})", fill="black")
    return sheet


def save_attention_png(
    path: str | Path,
    frames: Sequence[torch.Tensor | np.ndarray | Image.Image],
    maps: Mapping[str, torch.Tensor],
    layer: int | None = -1,
    cell: int = 160,
) -> Path:
    """Draw :func:`attention_sheet` and write it as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_sheet(frames, maps, layer=layer, cell=cell).save(path, format="PNG")
    return path


@torch.no_grad()
def query_attention_maps(
    model, frames: torch.Tensor, patches=None, kinds: Sequence[str] = KINDS
) -> dict[str, torch.Tensor]:
    """The attention of the coarse, fine and autoregressive queries of one clip, per frame.

    One patch pass serves all three. "coarse" is ``q_static`` (the query of the coarse tokens), "fine" the shifted
    queries of the coarse -> fine training pass, "autoregressive" the queries of true frame-by-frame inference.

    Args:
        model: a :class:`fovlm.model.vlm.FoveatedVLM`.
        frames: ImageNet-normalised frames [T, 3, H, W] on the model's device.
        patches: their patch pass (a :class:`fovlm.model.encoder.PatchCache`) when the caller already ran it.
        kinds: the kinds wanted (any of :data:`KINDS`); the autoregressive pass runs only when it is asked for.

    Returns:
        kind -> weights [T, L, h, K] (L DINO layers, h heads, K = 1 + 16*16 keys at 224 px), on the CPU, in the
        order of :data:`KINDS`.
    """
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown query kinds {unknown}; expected some of {KINDS}")
    num_frames = torch.tensor([frames.shape[0]], device=frames.device)
    if patches is None:
        patches = model.encode_patches(frames)

    def stack(per_layer: list[torch.Tensor]) -> torch.Tensor:
        # [T, h, k, K] per layer: a frame's k queries are averaged (k = 1: the one query's weights).
        return torch.stack([w.mean(2) for w in per_layer], dim=1).float().cpu()  # [T, L, h, K]

    maps = {}
    if "coarse" in kinds or "fine" in kinds:
        visual = model.visual_tokens(patches, num_frames, "coarse_fine", return_attention=True)
        maps["coarse"] = stack(visual.coarse_attention)
        maps["fine"] = stack(visual.fine_attention)
    if "autoregressive" in kinds:
        prefix = model.autoregressive_prefix(patches, num_frames, return_attention=True)
        maps["autoregressive"] = stack(prefix.attention)
    return {kind: maps[kind] for kind in KINDS if kind in kinds}
