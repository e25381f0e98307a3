"""Token roles: what each text token of a batch is, and the label of a position that is not a target.

Every encoded sample carries one role per text token (``roles``, right-padded with ``ROLE_PAD``). The chat
rendering assigns them, the collator pads them, and each loss head decides from them which tokens it scores,
so caption pre-training and fine-tuning read the same batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a text position whose next token is not a target (cross-entropy's ``ignore_index``)."""

ROLE_PAD = 0  # padding (never scored)
ROLE_SYSTEM = 1  # every token of the system turn, its markup included
ROLE_USER = 2  # every token of a user turn, its markup included
# assistant-turn markup that is not the answer: "<|im_start|>assistant\n" and the "\n" after <|im_end|>
ROLE_TEMPLATE = 3
ROLE_ANSWER = 4  # assistant content tokens AND that turn's closing <|im_end|>


def question_end(roles: Tensor) -> Tensor:
    """Where each sample's question ends: the number of leading tokens of its system turn and first user turn
    (the first token whose role is neither), long [B] from ``roles`` [B, S]. A question-first layout puts the
    visual tokens there."""
    in_question = (roles == ROLE_SYSTEM) | (roles == ROLE_USER)  # [B, S]
    first_other = (~in_question).long().argmax(1)  # [B]
    return torch.where(in_question.all(1), roles.new_full(first_other.shape, roles.shape[1]), first_other)
