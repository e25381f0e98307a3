"""Where the tokens of a batch sit in the LLM input: the per-sample sequence layout and the batch checks.

Sample i of a batch is [its visual tokens, its S_i text tokens] at positions 0, 1, ... with all padding on the
right: T_i frames of k tokens each (``num_queries``; frame-major, frame t's j-th token at t * k + j); a text-only
sample has no visual token. The layout functions take the visual tokens per sample (T_i * k). Packed
(:mod:`fovlm.model.packing`), samples share rows instead, each at its own offset with its own positions. The
functions here are pure tensor index arithmetic: they place visual and text embeddings into the flattened
[R * L] LLM input (R = B rows unless packed), read the text positions back out, shift the LLM-written queries by
one frame, and reject batches that cannot be laid out this way.

Shapes: B samples, F = sum(num_frames) real frames (concatenated in sample order), S text width, L sequence
width, Dl LLM width, Dq query width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fovlm.model.packing import place, positions


@dataclass
class SequenceLayout:
    """Where every visual and text token of a batch sits in the flattened [R * L] LLM input.

    One sample per row (R = B) unless packed (:mod:`fovlm.model.packing`): then several samples share a row,
    each at its own offset.

    Attributes:
        attention_mask: long [B, L], 1 on each sample's T_i + S_i real tokens (a prefix of the row); None when
            packed: the LLM then keeps the samples of a row apart by their positions (each restarts at 0).
        position_ids: long [R, L], each sample's tokens at 0, 1, ... from its own start.
        visual_index: long [F], flat row (r * L + column) of each visual token, in frame order.
        text_index: long [B, S], flat row of each text position; padded text positions point at some row of
            the same LLM row and must be ignored (``text_valid``).
        text_valid: bool [B, S], the real text positions.
    """

    attention_mask: Tensor | None
    position_ids: Tensor
    visual_index: Tensor
    text_index: Tensor
    text_valid: Tensor

    @property
    def rows(self) -> int:
        """Rows R of the LLM input."""
        return self.position_ids.shape[0]

    @property
    def width(self) -> int:
        """Sequence width L."""
        return self.position_ids.shape[1]


def frame_starts(num_frames: Tensor) -> Tensor:
    """Index of each sample's first frame in the concatenated frame list: long [B]."""
    return torch.cumsum(num_frames, 0) - num_frames


def frame_sample_ids(num_frames: Tensor) -> Tensor:
    """Sample index of every frame: long [F]."""
    return torch.repeat_interleave(torch.arange(len(num_frames), device=num_frames.device), num_frames)


def build_layout(
    num_frames: Tensor, text_mask: Tensor, visual_at: Tensor | None = None, pack_tokens: int | None = None
) -> SequenceLayout:
    """Per-sample layout: sample b = [its text before ``visual_at[b]``, its num_frames[b] visual tokens, the rest
    of its text], right-padded (``visual_at`` None: every sample's visual tokens first).

    Args:
        num_frames: long [B], visual tokens per sample (0 for text-only).
        text_mask: [B, S], 1 on real text tokens; must be right-padded (ones, then zeros).
        visual_at: long [B], text tokens before the visual ones (at most the sample's text length).
        pack_tokens: None: sample b alone in row b. Else the samples packed into rows of max(pack_tokens,
            longest sample) positions (:func:`fovlm.model.packing.first_fit_decreasing`).
    """
    batch, width_s = text_mask.shape
    device = num_frames.device
    visual_at = num_frames.new_zeros(batch) if visual_at is None else visual_at
    lengths = num_frames + text_mask.sum(1)  # [B]
    placement = place(lengths, pack_tokens)
    width = placement.width
    if pack_tokens is None:
        arange = torch.arange(width, device=device)
        attention_mask = (arange[None] < lengths[:, None]).long()  # [B, L]
        position_ids = arange[None].expand(batch, width)  # [B, L]
    else:
        attention_mask, position_ids = None, positions(placement, lengths)  # [R, L]
    start = placement.row * width + placement.offset  # [B] flat row of each sample's first token
    sample = frame_sample_ids(num_frames)  # [F]
    frame_in_sample = torch.arange(len(sample), device=device) - frame_starts(num_frames)[sample]  # [F]
    visual_index = start[sample] + visual_at[sample] + frame_in_sample  # [F]
    text_arange = torch.arange(width_s, device=device)[None]  # [1, S]
    after = text_arange >= visual_at[:, None]  # [B, S]
    text_pos = text_arange + torch.where(after, num_frames[:, None], 0)  # [B, S]
    in_row = (placement.offset[:, None] + text_pos).clamp(max=max(width - 1, 0))  # [B, S]
    text_index = (placement.row * width)[:, None] + in_row
    return SequenceLayout(attention_mask, position_ids, visual_index, text_index, text_mask.bool())


def predicting_index(layout: SequenceLayout, num_frames: Tensor, visual_at: Tensor | None) -> Tensor:
    """Flat row of the hidden state that predicts each text position's next text token [B, S]: the text
    position itself, except that the last text token before the visual tokens hands over to the last visual
    token (the sequence position just before the next text token)."""
    if visual_at is None:
        return layout.text_index
    hands_over = (num_frames > 0) & (visual_at > 0)  # [B]
    index = layout.text_index.clone()
    rows = hands_over.nonzero().squeeze(1)
    index[rows, visual_at[rows] - 1] += num_frames[rows]
    return index


def assemble(layout: SequenceLayout, visual: Tensor, text: Tensor) -> Tensor:
    """Place visual token embeddings [F, Dl] and text embeddings [B, S, Dl] into the LLM input [R, L, Dl].

    Padding rows are zero (they are masked). The result has the text embeddings' dtype.
    """
    dim = text.shape[-1]
    flat = text.new_zeros(layout.rows * layout.width, dim)  # [R*L, Dl]
    flat = flat.index_copy(0, layout.visual_index, visual.to(flat.dtype))
    flat = flat.index_copy(0, layout.text_index[layout.text_valid], text[layout.text_valid])
    return flat.view(layout.rows, layout.width, dim)


def gather_text(layout: SequenceLayout, hidden: Tensor, index: Tensor | None = None) -> Tensor:
    """Hidden states [R, L, Dl] at the text positions (or at ``index`` [B, S], e.g. :func:`predicting_index`)
    -> [B, S, Dl] (rows at padded text positions: arbitrary)."""
    return hidden.reshape(-1, hidden.shape[-1])[layout.text_index if index is None else index]


def split_text(input_ids: Tensor, attention_mask: Tensor, visual_at: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each sample's text cut at ``visual_at``: (head ids, head mask) [B, P] and (tail ids, tail mask) [B, S'],
    both right-padded (the tails shifted to start at column 0)."""
    width = input_ids.shape[1]
    columns = torch.arange(width, device=input_ids.device)[None]  # [1, S]
    head_width = int(visual_at.max()) if len(visual_at) else 0
    head_mask = attention_mask.long() * (columns < visual_at[:, None])
    lengths = attention_mask.long().sum(1) - visual_at  # [B]
    tail_width = int(lengths.max()) if len(lengths) else 0
    source = (visual_at[:, None] + columns[:, :tail_width]).clamp(max=max(width - 1, 0))  # [B, S']
    tail_mask = (columns[:, :tail_width] < lengths[:, None]).long()
    tail_ids = input_ids.gather(1, source) * tail_mask
    return input_ids[:, :head_width] * head_mask[:, :head_width], head_mask[:, :head_width], tail_ids, tail_mask


def join_text(head: Tensor, tail: Tensor, visual_at: Tensor, width: int) -> Tensor:
    """Undo :func:`split_text` on per-position values: head [B, P, ...] and tail [B, S', ...] -> [B, width, ...]
    (positions past a sample's text: zeros)."""
    joined = tail.new_zeros(tail.shape[0], width, *tail.shape[2:])
    joined[:, : head.shape[1]] = head
    columns = torch.arange(width, device=tail.device)[None]  # [1, S]
    offset = columns - visual_at[:, None]  # [B, S]
    rows, cols = ((offset >= 0) & (offset < tail.shape[1])).nonzero(as_tuple=True)
    joined[rows, cols] = tail[rows, offset[rows, cols]]
    return joined


def shift_queries(queries: Tensor, num_frames: Tensor, q_init: Tensor) -> Tensor:
    """One-frame query shift with k queries per frame: query j of frame t is the one made at frame t-1's j-th
    visual position; frame 0's k queries are ``q_init``.

    Args:
        queries: [F * k, Dq], the query head's output at every visual position (frame-major: frame f's j-th
            token at row f * k + j).
        num_frames: long [B].
        q_init: [k, Dq].
    """
    k = q_init.shape[0]
    previous = torch.cat([queries.new_zeros(k, queries.shape[1]), queries[:-k]])  # [F*k, Dq]
    first = frame_starts(num_frames)[num_frames > 0] * k  # row of each sample's first visual token
    is_first = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    is_first[(first[:, None] + torch.arange(k, device=queries.device)).flatten()] = True
    slot = torch.arange(len(queries), device=queries.device) % k  # [F*k]
    return torch.where(is_first[:, None], q_init.to(previous.dtype)[slot], previous)  # [F*k, Dq]


def select_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """[B, S, ...] -> [N, ...] rows where ``mask`` is True (row order = mask.nonzero()); all of x when None."""
    return x if mask is None else x[mask]


def frame_order(steps: list[Tensor], order: Tensor) -> Tensor:
    """Per-step results concatenated step-major, with ``order`` the frame of each row -> frame order [F, ...]."""
    stacked = torch.cat(steps)
    return stacked.new_zeros(stacked.shape).index_copy(0, order, stacked)


def pad_right(x: Tensor, width: int) -> Tensor:
    """Right-pad [B, S] with zeros to [B, width] (the values are masked out by the attention mask)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def check_batch(
    frames: Tensor,
    num_frames: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_mask: Tensor | None,
) -> None:
    """Reject a batch that cannot be laid out, with a message that says what is wrong.

    Args:
        frames: [F, 3, H, W] ImageNet-normalised floats, all real frames of the batch in sample order.
        num_frames: long [B], frames per sample (0: text-only); must sum to F.
        input_ids: long [B, S].
        attention_mask: [B, S], 1 on real text tokens; right-padded (ones, then zeros).
        logits_mask: bool [B, S] or None; may select real text positions only.
    """
    if num_frames.dim() != 1 or len(num_frames) != input_ids.shape[0]:
        raise ValueError(
            f"num_frames {tuple(num_frames.shape)} does not match batch size {input_ids.shape[0]}"
        )
    if not frames.is_floating_point():
        raise ValueError(
            f"frames must be ImageNet-normalised floats, got {frames.dtype} (normalise uint8 frames first)"
        )
    if (num_frames < 0).any() or int(num_frames.sum()) != frames.shape[0]:
        raise ValueError(
            f"num_frames sums to {int(num_frames.sum())} but frames holds {frames.shape[0]} frames"
        )
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ"
        )
    mask = attention_mask.long()
    if (mask[:, 1:] > mask[:, :-1]).any():
        bad = (mask[:, 1:] > mask[:, :-1]).any(1).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask must be right-padded (ones then zeros); samples {bad} are not")
    empty = ((num_frames == 0) & (mask.sum(1) == 0)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} have neither frames nor text")
    if logits_mask is not None:
        if logits_mask.shape != attention_mask.shape or logits_mask.dtype != torch.bool:
            raise ValueError(
                f"logits_mask must be bool {tuple(attention_mask.shape)}, got {logits_mask.dtype} "
                f"{tuple(logits_mask.shape)}"
            )
        if (logits_mask & (mask == 0)).any():
            raise ValueError("logits_mask selects padded text positions")
