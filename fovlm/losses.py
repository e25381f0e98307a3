"""The one shift-and-mask convention, cross-entropy, sequence log-probs, DPO, and the loss heads.

The per-token ``roles`` of every batch and ``IGNORE_INDEX`` are the data's (:mod:`fovlm.data.roles`).

- ``shift_labels``: labels aligned with text positions, ``labels[b, j]`` is the target predicted at text
  position ``j`` (token ``j + 1`` when it is scored, else ``IGNORE_INDEX``). Text token 0 is never a target,
  in every mode and head, so losses of different heads and modes are directly comparable.
- ``token_nll``: per-token negative log-likelihood of the selected logit rows (``[N, V]``, the rows where
  ``labels != IGNORE_INDEX``, in ``logits_mask.nonzero()`` order, as the model returns them). Cross-entropy,
  sequence log-probs and evaluation scores are all sums of it, so they share one convention.
- ``dpo_loss``: the sigmoid DPO loss and its metrics under TRL's names.
- ``look_loss``: -log of the written queries' attention share inside the answer's region (``lambda_look``).
- Loss heads ``AllTextCE``, ``AnswerOnlyCE`` and ``DPO``: each decides from ``roles`` which tokens count and
  runs the model forward it needs. Stages 1 and 2 therefore read the same batches.

Cross-entropy is a token mean over every scored token of the batch (no per-sample normalisation, as in the
fVLM original). A batch without any scored token gives a loss of exactly 0 that still carries a graph (so
backward and DDP work) and reports ``num_scored == 0`` so the caller can count it; it never gives NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fovlm.data.roles import IGNORE_INDEX, ROLE_ANSWER, ROLE_PAD, question_end
from fovlm.reference_logps import CachedReference

LOSS_NAMES = ("all_text", "answer_only", "dpo")


# ---------------------------------------------------------------------------------------------------------------
# Pure functions


def all_text_mask(roles: Tensor) -> Tensor:
    """Score mask of the all-text head: every real (non-pad) token. ``roles`` [B, S] -> bool [B, S]."""
    return roles != ROLE_PAD


def answer_only_mask(roles: Tensor) -> Tensor:
    """Score mask of the answer-only heads: answer tokens and their closing ``<|im_end|>``. -> bool [B, S]."""
    return roles == ROLE_ANSWER


def shift_labels(input_ids: Tensor, score_mask: Tensor) -> Tensor:
    """Targets aligned with text positions: position ``j`` predicts token ``j + 1`` if that token is scored.

    Args:
        input_ids: long [B, S] text token ids.
        score_mask: bool [B, S], True on tokens that are targets (decided by a loss head from the roles).

    Returns:
        long [B, S]: ``labels[b, j] = input_ids[b, j + 1]`` where ``score_mask[b, j + 1]``, else
        ``IGNORE_INDEX``; the last column is always ``IGNORE_INDEX``. ``labels != IGNORE_INDEX`` is the
        ``logits_mask`` the model takes.
    """
    if input_ids.shape != score_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and score_mask {tuple(score_mask.shape)} differ")
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # [B, S]
    next_ids = input_ids[:, 1:]  # [B, S-1]
    labels[:, :-1] = torch.where(score_mask[:, 1:].bool(), next_ids, torch.full_like(next_ids, IGNORE_INDEX))
    return labels


def selected_targets(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mask the model needs and, in the same row order as its ``[N, V]`` logits, targets and sample ids.

    Returns:
        logits_mask bool [B, S]; targets long [N]; sample_index long [N] (the batch row of each target).
    """
    logits_mask = labels != IGNORE_INDEX  # [B, S]
    sample_index = logits_mask.nonzero()[:, 0]  # [N], row-major like the model's selection
    targets = labels[logits_mask]  # [N]
    return logits_mask, targets, sample_index


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood of each target under its logit row, computed in fp32.

    Args:
        logits: [N, V] the selected rows (any float dtype).
        targets: long [N].

    Returns:
        float32 [N]. ``-token_nll`` is the per-token log-prob (log-softmax gathered at the target, done by
        ``cross_entropy`` without materialising a second [N, V] tensor).
    """
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, V] with N = len(targets) = {targets.shape[0]}")
    return F.cross_entropy(logits.float(), targets, reduction="none")  # [N]


def per_sample_sums(values: Tensor, sample_index: Tensor, batch_size: int) -> Tensor:
    """Sum per-token ``values`` [N] into their samples -> [batch_size] (zero for a sample with no token)."""
    out = values.new_zeros(batch_size)  # [B]
    return out.index_add(0, sample_index, values)


def token_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Mean cross-entropy over all scored tokens of a batch.

    Returns:
        (loss, num_scored). With no scored token the loss is an exact 0 that is still connected to ``logits``
        (so backward runs and gives zero gradients) instead of the NaN of a mean over nothing.
    """
    nll = token_nll(logits, targets)  # [N]
    return mean_or_zero(nll, logits), int(nll.numel())


def mean_or_zero(nll: Tensor, logits: Tensor) -> Tensor:
    """Mean of ``nll`` [N]; for N = 0 an exact 0 still connected to ``logits`` (never NaN)."""
    if nll.numel() == 0:
        return logits.float().sum() * 0.0
    return nll.mean()


def sequence_logps(logits: Tensor, targets: Tensor, sample_index: Tensor, batch_size: int) -> Tensor:
    """Sum of the log-probs of each sequence's scored tokens (no length normalisation) -> float32 [batch_size]."""
    return per_sample_sums(-token_nll(logits, targets), sample_index, batch_size)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Sigmoid DPO loss (Rafailov et al.) and its metrics, named as TRL names them.

    All inputs are [B] sequence log-probs. The implicit rewards are ``beta * (policy - reference)``;
    the per-pair loss is ``-log sigmoid(r_chosen - r_rejected)``.

    Returns:
        (loss: mean over pairs, per-pair losses [B], metrics: detached scalars ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (fraction with a strictly positive
        margin, so ties count as wrong), ``logps/chosen``, ``logps/rejected`` (policy)).
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # [B]
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # [B]
    margins = chosen_rewards - rejected_rewards  # [B]
    losses = -F.logsigmoid(margins)  # [B]
    metrics = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": margins.detach().mean(),
        "rewards/accuracies": (margins.detach() > 0).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), losses, metrics


def box_patches(boxes: Tensor, grid: int) -> Tensor:
    """bool [n, grid * grid] (row-major): for each box [n, 4] (x0, y0, x1, y1 in fractions of the frame), the
    patches of a ``grid x grid`` patch grid whose centres lie in it (lower bounds inclusive, upper exclusive)."""
    centres = (torch.arange(grid, dtype=torch.float64, device=boxes.device) + 0.5) / grid  # [G]
    boxes = boxes.double()
    inside_x = (centres >= boxes[:, 0:1]) & (centres < boxes[:, 2:3])  # [n, G]
    inside_y = (centres >= boxes[:, 1:2]) & (centres < boxes[:, 3:4])  # [n, G]
    return (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)  # [n, G*G]


def query_targets(
    inside: Tensor, valid: Tensor, spread: Tensor, k: int, spread_over: int
) -> tuple[Tensor, Tensor]:
    """Each of a frame's k queries' target patches, for n readings of a region of R boxes (the rule of
    :func:`look_loss`): one box is every query's target; a spread region's places are shared out by
    ``spread_over`` = K, query j reading places j, j + K, j + 2K, ... together.

    Args:
        inside: bool [n, R, G*G], the patches whose centres lie in each box.
        valid: bool [n, R], the boxes that exist (False: padding).
        spread: bool [n], the readings whose boxes are the places of a spread answer.
        k: queries per frame.
        spread_over: K >= k.

    Returns:
        (bool [n, k, G*G] each query's target patches, bool [n, k] the queries that have a target).
    """
    if spread_over < k:
        raise ValueError(f"spread_over={spread_over} is smaller than the {k} queries per frame")
    places, device = inside.shape[1], inside.device
    shared_out = (torch.arange(places, device=device)[:, None] % spread_over) == torch.arange(k, device=device)
    assign = torch.where(spread[:, None, None], shared_out, torch.ones_like(shared_out))  # [n, R, k]
    assign = assign & valid[:, :, None]
    target = (assign.transpose(1, 2).float() @ inside.float()) > 0  # [n, k, G*G]
    return target, assign.any(1)


def look_loss(
    attention: Tensor, num_frames: Tensor, region_box: Tensor, region_frames: Tensor,
    region_spread: Tensor | None = None, spread_over: int | None = None,
) -> tuple[Tensor, int]:
    """How far the queries the LLM wrote look from the answer's region: -log of the attention share inside it.

    The share of a query on a frame is its attention (heads averaged) on the patches whose centres lie in its
    target; the CLS key counts as outside. A one-box region is every query's target. A spread region's places
    are shared out over a frame's queries by the model's largest budget K (``spread_over``): query j's target is
    places j, j + K, j + 2K, ... together, so what a query is taught does not depend on the budget drawn and
    budgets nest; a query with no place (j >= the number of places) is not counted. The share is taken for every
    query of each frame that holds the region and whose queries the LLM wrote, i.e. every frame of a sample but
    its first (read by ``q_init``); the loss is the mean of -log(share) over them.

    Args:
        attention: [F, h, k, N] one DINO layer's attention of the written queries (N = 1 CLS + G*G patches).
        num_frames: long [B], frames per sample.
        region_box: float [B, R, 4] (or [B, 4]), each sample's boxes (NaN rows: no box; R = 1 for one box).
        region_frames: bool [F], the frames that hold their sample's region.
        region_spread: bool [B], the samples whose boxes are the places of a spread answer (default: none).
        spread_over: K, the number of queries spread places are shared out over (default: k).

    Returns:
        (loss, number of (frame, query) readings counted); with none, a zero that keeps the graph.
    """
    keys, k = attention.shape[-1], attention.shape[2]
    grid = math.isqrt(keys - 1)
    if grid * grid != keys - 1:
        raise ValueError(f"{keys} attention keys are not 1 CLS + a square patch grid")
    device = attention.device
    if region_box.dim() == 2:
        region_box = region_box[:, None]  # [B, 1, 4]
    region_box, num_frames = region_box.to(device), num_frames.to(device)
    batch, places = region_box.shape[:2]
    spread_over = spread_over or k
    sample = torch.repeat_interleave(torch.arange(batch, device=device), num_frames)  # [F]
    starts = torch.cumsum(num_frames, 0) - num_frames  # [B]
    written = torch.arange(len(sample), device=device) > starts[sample]  # [F]: not a sample's first frame
    valid = ~region_box.isnan().any(-1)  # [B, R]
    counted = region_frames.to(device) & written & valid[sample].any(-1)  # [F]
    if not counted.any():
        return attention.sum() * 0.0, 0
    owner = sample[counted]  # [n]
    inside = box_patches(region_box[owner].flatten(0, 1), grid).view(len(owner), places, -1)  # [n, R, G*G]
    spread = torch.zeros(batch, dtype=torch.bool, device=device) if region_spread is None else region_spread
    target, has_target = query_targets(inside, valid[owner], spread.to(device)[owner], k, spread_over)
    heads = attention[counted].float().mean(1)[..., 1:]  # [n, k, G*G]
    share = (heads * target).sum(-1)[has_target]  # [readings]: the queries that have a target
    if share.numel() == 0:
        return attention.sum() * 0.0, 0
    return -torch.log(share.clamp_min(1e-6)).mean(), share.numel()


# ---------------------------------------------------------------------------------------------------------------
# Loss heads


def visual_positions(model: Any, roles: Tensor) -> Tensor | None:
    """Where a question-first model's visual tokens go in each sample (after its system and first user turns,
    :func:`fovlm.data.roles.question_end`); None for a model that reads the frames first."""
    return question_end(roles) if getattr(model, "question_first", False) else None


@dataclass
class LossOutput:
    """What a head returns for one batch.

    ``sample_loss`` and ``sample_weight`` ([B], detached) let callers aggregate per source or over a whole
    validation set with the head's own weighting: for CE, summed token NLL and scored-token count per
    sample (so ``sum(sample_loss) / sum(sample_weight)`` is the batch's token-mean CE); for DPO, the
    per-pair loss and 1.
    """

    loss: Tensor
    num_scored: int
    sample_loss: Tensor
    sample_weight: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadOptions:
    """How a head runs the model on one batch.

    Args:
        mode: the model's forward mode (e.g. ``coarse_fine``).
        lambda_coarse: weight of the auxiliary coarse_only cross-entropy (CE heads).
        lambda_ar: weight of the auxiliary autoregressive cross-entropy (CE heads).
        reference: the frozen reference model (DPO), or its log-probabilities read from a cache
            (:class:`~fovlm.reference_logps.CachedReference`).
        lambda_look: weight of the look loss (CE heads in coarse_fine, on batches that say where their answers
            are: :func:`look_loss` on the last DINO layer).
        lambda_look_ar: weight of the same loss on the queries the autoregressive pass writes (CE heads, where
            that pass runs: with ``lambda_ar`` or in autoregressive mode).
    """

    mode: str = "coarse_fine"
    lambda_coarse: float = 0.0
    lambda_ar: float = 0.0
    reference: Any = None
    lambda_look: float = 0.0
    lambda_look_ar: float = 0.0


class LossHead:
    """A loss head: decides from a batch's ``roles`` which tokens count, and runs the model passes it needs."""

    name = ""

    def score_mask(self, roles: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        model: Any,
        batch: dict[str, Any],
        *,
        mode: str = "coarse_fine",
        lambda_coarse: float = 0.0,
        lambda_ar: float = 0.0,
        reference: Any = None,
        lambda_look: float = 0.0,
        lambda_look_ar: float = 0.0,
    ) -> LossOutput:
        """The head's loss of ``model`` on ``batch`` (the arguments are :class:`HeadOptions`')."""
        return self.compute(
            model, batch, HeadOptions(mode, lambda_coarse, lambda_ar, reference, lambda_look, lambda_look_ar))

    def compute(self, model: Any, batch: dict[str, Any], options: HeadOptions) -> LossOutput:
        raise NotImplementedError


class CrossEntropyHead(LossHead):
    """Token cross-entropy on the tokens chosen by ``score_mask``; shared by the two CE heads."""

    def compute(self, model: Any, batch: dict[str, Any], options: HeadOptions) -> LossOutput:
        """Run ``model`` on an SFT/caption batch and return the CE, plus ``lambda_coarse`` x the coarse_only CE
        and ``lambda_ar`` x the autoregressive CE (auxiliary losses on the same targets), and ``lambda_look`` x
        the look loss where the batch says where its answers are (``lambda_look_ar`` x the same on the
        autoregressive pass's queries)."""
        mode, lambda_coarse, lambda_ar = options.mode, options.lambda_coarse, options.lambda_ar
        look = options.lambda_look > 0 and mode == "coarse_fine" and "region_box" in batch
        look_ar = (options.lambda_look_ar > 0 and (lambda_ar > 0 or mode == "autoregressive")
                   and "region_box" in batch)
        labels = shift_labels(batch["input_ids"], self.score_mask(batch["roles"]))  # [B, S]
        logits_mask, targets, sample_index = selected_targets(labels)
        batch_size = labels.shape[0]
        out = model(
            batch["frames"],
            batch["num_frames"],
            batch["input_ids"],
            batch["attention_mask"],
            mode=mode,
            logits_mask=logits_mask,
            return_coarse_logits=lambda_coarse > 0,
            return_autoregressive_logits=lambda_ar > 0,
            visual_at=visual_positions(model, batch["roles"]),
            **({"return_fine_attention": True} if look else {}),
            **({"return_autoregressive_attention": True} if look_ar else {}),
        )
        nll = token_nll(out.logits, targets)  # [N]
        num_scored = int(nll.numel())
        loss = mean_or_zero(nll, out.logits)
        fine = loss.detach()  # the mode's own loss, before the auxiliary ones
        metrics: dict[str, Tensor] = {}
        for name, weight, logits in (("coarse", lambda_coarse, out.coarse_logits),
                                     ("autoregressive", lambda_ar, out.autoregressive_logits)):
            if weight > 0:
                aux_loss, _ = token_cross_entropy(logits, targets)
                metrics.setdefault("loss_fine", fine)
                metrics[f"loss_{name}"] = aux_loss.detach()
                loss = loss + weight * aux_loss
        for name, weight, attention in (("loss_look", options.lambda_look, out.fine_attention if look else None),
                                        ("loss_look_autoregressive", options.lambda_look_ar,
                                         out.autoregressive_attention if look_ar else None)):
            if attention is not None:
                look_value, _ = look_loss(attention[-1], batch["num_frames"], batch["region_box"],
                                          batch["region_frames"], batch.get("region_spread"),
                                          getattr(model, "num_queries", None))
                metrics.setdefault("loss_fine", fine)
                metrics[name] = look_value.detach()
                loss = loss + weight * look_value
        sample_loss = per_sample_sums(nll.detach(), sample_index, batch_size)  # [B]
        sample_weight = per_sample_sums(torch.ones_like(nll), sample_index, batch_size)  # [B]
        return LossOutput(loss, num_scored, sample_loss, sample_weight, metrics)


class AllTextCE(CrossEntropyHead):
    """Stage 1: every text token after the first is a target (system and user turns included)."""

    name = "all_text"

    def score_mask(self, roles: Tensor) -> Tensor:
        return all_text_mask(roles)


class AnswerOnlyCE(CrossEntropyHead):
    """Stage 2 and evaluation: only assistant answers and their closing ``<|im_end|>`` are targets."""

    name = "answer_only"

    def score_mask(self, roles: Tensor) -> Tensor:
        return answer_only_mask(roles)


class DPO(LossHead):
    """Stage 3: sigmoid DPO on preference batches against a frozen reference model.

    Args:
        beta: inverse temperature of the implicit reward (0.1 in the recipe).
    """

    name = "dpo"

    def __init__(self, beta: float = 0.1) -> None:
        if not beta > 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        self.beta = beta

    def score_mask(self, roles: Tensor) -> Tensor:
        return answer_only_mask(roles)

    def _sides(self, batch: dict[str, Any]) -> tuple[list[tuple[Tensor, Tensor, Tensor]], list[Tensor]]:
        inputs, labels_per_side = [], []
        for side in ("chosen", "rejected"):
            ids = batch[f"{side}_input_ids"]
            labels = shift_labels(ids, self.score_mask(batch[f"{side}_roles"]))  # [B, S_side]
            inputs.append((ids, batch[f"{side}_attention_mask"], labels != IGNORE_INDEX))
            labels_per_side.append(labels)
        return inputs, labels_per_side

    def pair_logps(self, model: Any, batch: dict[str, Any], mode: str = "coarse_fine",
                   sides: tuple[list, list[Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """Sequence log-probs (chosen, rejected) float32 [B] of ``model`` on a preference batch: the policy's, the
        reference model's, and what ``fovlm reference-logps`` caches (the same code, so the same numbers).
        ``sides``: the batch's model inputs and labels per side, when already made."""
        (chosen, rejected), labels_per_side = sides or self._sides(batch)
        batch_size = labels_per_side[0].shape[0]
        chosen_logits, rejected_logits = model.forward_pair(
            batch["frames"], batch["num_frames"], chosen, rejected, mode=mode,
            visual_at=visual_positions(model, batch["chosen_roles"]),
        )
        result = []
        for logits, labels in ((chosen_logits, labels_per_side[0]), (rejected_logits, labels_per_side[1])):
            _, targets, sample_index = selected_targets(labels)
            result.append(sequence_logps(logits, targets, sample_index, batch_size))  # [B]
        return result[0], result[1]

    def compute(self, model: Any, batch: dict[str, Any], options: HeadOptions) -> LossOutput:
        """Run the policy and the reference model on a preference batch; ``reference`` runs without gradients.

        ``reference`` may instead be a :class:`~fovlm.reference_logps.CachedReference`: the reference model's
        log-probabilities read from a cache (by the batch's keys, at the policy's k queries per frame)."""
        mode, reference = options.mode, options.reference
        if reference is None:
            raise ValueError("the DPO loss needs a reference model (or cached reference log-probabilities)")
        if options.lambda_coarse > 0 or options.lambda_ar > 0 or options.lambda_look > 0:
            raise ValueError("the DPO loss has no auxiliary losses (lambda_coarse, lambda_ar, lambda_look must be 0)")
        sides = self._sides(batch)
        policy_chosen, policy_rejected = self.pair_logps(model, batch, mode, sides)
        if isinstance(reference, CachedReference):
            k = getattr(model, "active_queries", 1)
            reference_chosen, reference_rejected = reference.logps(batch, k, policy_chosen.device)
        else:
            with torch.no_grad():
                reference_chosen, reference_rejected = self.pair_logps(reference, batch, mode, sides)
        loss, losses, metrics = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta
        )
        chosen_labels, rejected_labels = sides[1]
        num_scored = int((chosen_labels != IGNORE_INDEX).sum() + (rejected_labels != IGNORE_INDEX).sum())
        return LossOutput(loss, num_scored, losses.detach(), torch.ones_like(losses), metrics)


def build_loss_head(loss: str, beta: float = 0.1) -> LossHead:
    """The head named by the config's ``loss`` string: ``all_text``, ``answer_only`` or ``dpo``."""
    if loss == "all_text":
        return AllTextCE()
    if loss == "answer_only":
        return AnswerOnlyCE()
    if loss == "dpo":
        return DPO(beta)
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSS_NAMES)}")

