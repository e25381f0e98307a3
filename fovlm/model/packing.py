"""Packing a batch's sequences into shared rows: where each sample goes, and how much of the LLM input is padding.

Without packing, sample i of a batch of B fills row i of a [B, L] LLM input, L the longest sample, so a batch
that mixes a long conversation with short captions is mostly padding. Packed, the samples share rows of a fixed
width W (at least the longest sample): first-fit decreasing puts each sample, longest first, at the end of the
first row it still fits in. Each sample keeps its own positions 0, 1, ... and attends only to itself (the LLM
sees where a sample starts from its positions; :mod:`fovlm.model.layout`). Rows are at most a token budget wide
(the longest sample, if that is longer): of the widths up to it, the one with the least padding is chosen
(:func:`tightest`). Wider rows pad less but cost more attention (each row attends over its whole width).

Which samples form a batch is not changed (that is the epoch plan's job): only how the batch is laid out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowPlacement:
    """Where every sample of a batch sits in the LLM input.

    Attributes:
        row: long [B], the row of each sample.
        offset: long [B], the column of each sample's first token in its row.
        rows: R, rows of the LLM input.
        width: W, columns of the LLM input.
    """

    row: Tensor
    offset: Tensor
    rows: int
    width: int


def one_per_row(lengths: Tensor) -> RowPlacement:
    """Sample i alone in row i, rows as wide as the longest sample (the layout without packing)."""
    width = int(lengths.max()) if len(lengths) else 0
    return RowPlacement(torch.arange(len(lengths), device=lengths.device), torch.zeros_like(lengths), len(lengths), width)


def first_fit_decreasing(lengths: Tensor, capacity: int = 1) -> RowPlacement:
    """Pack samples of ``lengths`` into as few rows as first-fit decreasing finds, rows holding at most
    max(capacity, longest) tokens; the placement's width is that of its fullest row.

    Deterministic: samples are taken longest first (ties in batch order), each into the first row with room.

    Args:
        lengths: long [B], tokens of each sample (every one at least 1).
        capacity: the most tokens a row holds (raised to the longest sample).
    """
    sizes = lengths.tolist()
    width = max([capacity, *sizes])
    fill: list[int] = []
    row, offset = [0] * len(sizes), [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        r = next((r for r, used in enumerate(fill) if used + sizes[i] <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        row[i], offset[i] = r, fill[r]
        fill[r] += sizes[i]
    device = lengths.device
    return RowPlacement(torch.tensor(row, device=device, dtype=torch.long),
                        torch.tensor(offset, device=device, dtype=torch.long), len(fill), max(fill, default=0))


def tightest(lengths: Tensor, max_width: int = 1) -> RowPlacement:
    """The first-fit-decreasing placement with the fewest padded positions among row widths from the longest
    sample up to ``max_width`` (if that is longer).

    For the few smallest row counts R that rows of ``max_width`` allow, the narrowest width that first-fit
    decreasing packs into R rows is found by bisection; the narrowest rows (the longest sample's width) are a
    candidate too. Ties go to the narrower rows, whose attention costs less.
    """
    if not len(lengths):
        return one_per_row(lengths)
    total, floor = int(lengths.sum()), int(lengths.max())
    ceiling = max(floor, max_width)
    candidates = [first_fit_decreasing(lengths, floor)]
    fewest = -(-total // ceiling)
    for rows in range(fewest, min(fewest + 4, len(lengths) + 1)):
        low, high = max(floor, -(-total // rows)), ceiling
        if first_fit_decreasing(lengths, high).rows > rows:
            continue
        while low < high:  # the narrowest width that still packs into `rows` rows
            middle = (low + high) // 2
            if first_fit_decreasing(lengths, middle).rows <= rows:
                high = middle
            else:
                low = middle + 1
        candidates.append(first_fit_decreasing(lengths, high))
    return min(candidates, key=lambda p: (p.rows * p.width, p.width))


def place(lengths: Tensor, pack_tokens: int | None) -> RowPlacement:
    """The placement for a packing setting: None, one sample per row; else :func:`tightest` with rows of at
    most ``pack_tokens`` positions (or the longest sample's length, if that is longer)."""
    return one_per_row(lengths) if pack_tokens is None else tightest(lengths, pack_tokens)


def positions(placement: RowPlacement, lengths: Tensor) -> Tensor:
    """Position ids [R, W]: each sample counts from 0 at its own offset; the padding after a row's last sample
    continues that sample's count (causal attention keeps it out of every real token's view)."""
    device = lengths.device
    starts = torch.zeros(placement.rows, placement.width, dtype=torch.long, device=device)
    real = lengths > 0
    starts[placement.row[real], placement.offset[real]] = placement.offset[real]
    columns = torch.arange(placement.width, device=device)
    return columns[None] - starts.cummax(1).values  # offsets grow along a row: the latest start at or before


def padding(lengths: Tensor, pack_tokens: int | None) -> tuple[int, int]:
    """(positions holding no token, all R x W positions) of the LLM input for ``lengths`` laid out with
    ``pack_tokens``."""
    placement = place(lengths, pack_tokens)
    total = placement.rows * placement.width
    return total - int(lengths.sum()), total


def padding_share(lengths: Tensor, pack_tokens: int | None) -> float:
    """Share of the LLM input's R x W positions that hold no token, for ``lengths`` laid out with ``pack_tokens``."""
    padded, total = padding(lengths, pack_tokens)
    return padded / total if total else 0.0
