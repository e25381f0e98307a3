"""fovlm as a model of the lmms-eval harness: ``python -m lmms_eval --model fovlm --model_args pretrained=FOLDER``.

    python -m lmms_eval --model fovlm --model_args pretrained=exported/fovlm-135m,mode=autoregressive \\
        --tasks videomme --output_path runs/lmms-eval

:class:`Fovlm` implements lmms-eval 0.7.3's ``lmms`` interface for simple (non-chat) models; the
``lmms_eval.models`` entry point (:mod:`fovlm.eval.lmms_entry`) registers it under the name ``fovlm``. Its
``model_args`` are :class:`Fovlm`'s arguments (docs/model.md#scoring-and-generation-in-lmms-eval).

- **Frames** are read as ``fovlm predict`` and ``fovlm eval`` read them (:func:`fovlm.eval.predict.load_media`:
  1 FPS, at most ``max_frames`` spread over longer videos, cover-resize and centre crop, an image replicated
  to ``image_frames``), with the frame settings the model was trained with unless ``model_args`` override them.
  A task's ``doc_to_visual`` may give one video, image or folder path, one PIL image, or several images or
  image paths (taken as frames already sampled at 1 FPS).
- **loglikelihood**: a request's context is the user turn and its continuation (stripped) the assistant's
  answer, scored with its closing ``<|im_end|>`` as ``fovlm eval --answer-format cloze`` scores an option. The
  requests of one document and context (a multiple-choice question's options) are scored together by
  :func:`fovlm.eval.scoring.score_question` in ``mode``: one patch pass, one prompt pass, each continuation on
  the prompt's KV cache. Each request gets ``(value, is_greedy)``; ``is_greedy`` says whether every answer token
  (and ``<|im_end|>``) is the model's top token. ``value`` depends on ``score``: ``nll`` (default), the mean
  answer-token negative log-likelihood, is what lmms-eval 0.7.3's ``multiple_choice`` tasks take (they pick the
  option with the lowest value, and its own models return their loss), and it is fovlm's own rule, so
  lmms-eval's accuracy is ``fovlm eval``'s; ``logprob``, the summed log-probability of the answer tokens, is
  lm-eval's documented meaning (``loglikelihood`` tasks' perplexity, ``acc_mutual_info``).
- **generate_until** answers with :func:`fovlm.eval.predict.answer`, ``fovlm predict``'s decoding (the
  autoregressive visual pass, then greedy or, with ``temperature > 0`` and sampling asked for, sampled decoding
  until ``<|im_end|>``); the answer is cut at the first of the task's ``until`` strings.
- Text-only requests (lmms-eval's ``acc_mutual_info`` scores each option after an empty context, without a
  document) and multi-round generation are not supported: they raise an error that says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from fovlm.data.contract import FrameSettings
from fovlm.data.frames import (
    IMAGE_SUFFIXES,
    decode_images,
    normalize,
    replicate_image,
    resize_cover_crop,
    select_frame_indices,
    to_uint8_chw,
)
from fovlm.data.roles import IGNORE_INDEX
from fovlm.eval.predict import answer, load_media
from fovlm.eval.questions import OptionTokens, render_options
from fovlm.eval.scoring import score_on_prefix, score_question
from fovlm.losses import per_sample_sums
from fovlm.model.pretrained import load_any, use_queries
from fovlm.model.vlm import MODES

log = logging.getLogger(__name__)

SCORES = ("nll", "logprob")
"""What :meth:`Fovlm.loglikelihood` returns first: the mean answer-token NLL or the summed log-probability."""


def visual_frames(visuals: Any, settings: FrameSettings) -> Tensor:
    """uint8 [T, 3, S, S] frames of a document's visuals (what a task's ``doc_to_visual`` returns).

    One video, image or folder path is read by :func:`fovlm.eval.predict.load_media`; one PIL image is
    replicated to ``settings.image_frames``; several PIL images or image paths are frames already sampled at
    1 FPS (at most ``settings.max_frames``, spread uniformly).
    """
    items = [v for v in (visuals if isinstance(visuals, list | tuple) else [visuals]) if v is not None]
    if not items:
        raise ValueError("the document has no visual: fovlm answers about a video or an image")
    size = settings.frame_size
    if len(items) == 1 and isinstance(items[0], str | os.PathLike):
        return load_media(items[0], settings.fps, settings.max_frames, settings.image_frames, size)[0]
    kept = [items[i] for i in select_frame_indices(len(items), settings.max_frames)]
    if all(isinstance(v, Image.Image) for v in items):
        frames = torch.stack([to_uint8_chw(resize_cover_crop(v, size)) for v in kept])  # [T, 3, S, S]
        return replicate_image(frames, settings.image_frames) if len(items) == 1 else frames
    if all(isinstance(v, str | os.PathLike) and Path(v).suffix.lower() in IMAGE_SUFFIXES for v in items):
        return decode_images([Path(v).read_bytes() for v in kept], size)
    kinds = sorted({type(v).__name__ for v in items})
    raise ValueError(f"fovlm reads one video, image or folder path, or a sequence of images; got {len(items)} "
                     f"visuals of type {', '.join(kinds)}")


def scores_and_greedy(step, cache, prefix_length: int, last_logits: Tensor, options: OptionTokens) -> Tensor:
    """:func:`fovlm.eval.scoring.score_on_prefix` on the same arguments, with what lmms-eval also asks for.

    Returns:
        float32 [n, 3]: per option the mean answer-token NLL, the summed log-probability of the answer tokens
        and 1.0 where each of them is the top token at its position (greedy decoding would write the answer).
    """
    seen: list[Tensor] = []

    def recording(*args, **kwargs) -> Tensor:
        logits = step(*args, **kwargs)  # [N, V] at the scored option positions
        seen.append(logits)
        return logits

    mean = score_on_prefix(recording, cache, prefix_length, last_logits, options)  # [n]
    device = mean.device
    labels = options.option_labels.to(device)  # [n, L]
    scored = labels != IGNORE_INDEX  # [n, L]
    wrong = (seen[0].argmax(dim=-1) != labels[scored]).float()  # [N]
    misses = per_sample_sums(wrong, scored.nonzero()[:, 0], options.num_options)  # [n]
    first = last_logits.reshape(-1).argmax() == options.first_targets.to(device)  # [n]
    greedy = first & (misses == 0)
    total = -mean * options.num_targets.to(device).float()  # [n]
    return torch.stack([mean, total, greedy.float()], dim=1)


def decoding(gen_kwargs: dict[str, Any], max_new_tokens: int) -> tuple[int, float, float, list[str]]:
    """(max_new_tokens, temperature, top_p, stop strings) from a task's generation kwargs (Hugging Face names).

    Sampling needs ``temperature > 0`` and ``do_sample`` not false; otherwise decoding is greedy.
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    top_p = float(gen_kwargs.get("top_p") or 1.0)
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        log.warning("fovlm decodes without beam search: num_beams=%s is ignored", gen_kwargs["num_beams"])
    return int(gen_kwargs.get("max_new_tokens") or max_new_tokens), temperature, min(top_p, 1.0), until


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text


def default_device() -> str:
    """The GPU of this process (``LOCAL_RANK`` under ``accelerate launch``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


class Fovlm(lmms):
    """An exported fovlm folder or FoveatedModule checkpoint as an lmms-eval model.

    Args:
        pretrained: the exported folder or ``.ckpt``.
        mode: the forward mode that scores loglikelihood requests (one of :data:`fovlm.model.vlm.MODES`);
            generation is always autoregressive.
        score: what loglikelihood returns first, ``nll`` or ``logprob`` (:data:`SCORES`; the module docstring).
        num_queries: visual tokens per frame k (default: all the model holds).
        frame_size, max_frames, image_frames: frame settings (default: as the model was trained).
        max_new_tokens: the generation limit when a task does not set one.
        tokenizer: a tokenizer folder that overrides the model's.
        device: where the model runs (default: this process's GPU, else the CPU).
        batch_size, max_batch_size: lmms-eval's; requests are scored one document at a time.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        mode: str = "autoregressive",
        score: str = "nll",
        num_queries: int | None = None,
        frame_size: int | None = None,
        max_frames: int | None = None,
        image_frames: int | None = None,
        max_new_tokens: int = 200,
        tokenizer: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.mode, self.score, self.max_new_tokens = mode, score, int(max_new_tokens)
        self._device = torch.device(device or default_device())
        pretrained = str(pretrained)
        model, self.tokenizer, data = load_any(pretrained, self._device, tokenizer)
        use_queries(model, num_queries, pretrained)
        self.model = model.eval()
        self.settings = data.overridden(frame_size, max_frames, image_frames)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def _document(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    @torch.no_grad()
    def score_continuations(self, context: str, continuations: Sequence[str], visuals: Any) -> Tensor:
        """float32 [n, 3] (:func:`scores_and_greedy`) of each continuation as the answer to ``context`` about
        ``visuals``, in ``self.mode``, all on one patch pass and one prompt pass."""
        answers = [c.strip() for c in continuations]
        listed = answers if len(answers) > 1 else answers * 2  # the option layout needs two rows
        options = render_options(self.tokenizer, context, listed, answer_format="cloze")
        frames = normalize(visual_frames(visuals, self.settings)).to(self._device)
        table = score_question(self.model, frames, options, (self.mode,), score_options=scores_and_greedy)
        return table[self.mode][: len(answers)].cpu()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(value, is_greedy)`` per request, in request order; ``value`` as ``score`` says."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            if len(request.args) != 6:
                raise ValueError("fovlm scores an answer about a document's video or image; this request has no "
                                 "document (text-only scores such as lmms-eval's acc_mutual_info are not supported)")
            context, _, _, doc_id, task, split = request.args
            groups.setdefault((task, split, doc_id, context), []).append(index)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        column = SCORES.index(self.score)
        for (task, split, doc_id, context), indices in tqdm(
            groups.items(), desc="fovlm loglikelihood", disable=self.rank != 0
        ):
            doc = self._document(task, split, doc_id)
            targets = [requests[i].args[1] for i in indices]
            continuations = [t if isinstance(t, str) else str(t(doc)) for t in targets]
            table = self.score_continuations(context, continuations, requests[indices[0]].args[2](doc))
            for i, row in zip(indices, table.tolist()):
                results[i] = (row[column], bool(row[2]))
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """``fovlm predict``'s answer to each request's context about its document, cut at its stop strings."""
        answers = []
        for request in tqdm(requests, desc="fovlm generate_until", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            frames = visual_frames(doc_to_visual(self._document(task, split, doc_id)), self.settings)
            max_new_tokens, temperature, top_p, until = decoding(dict(gen_kwargs or {}), self.max_new_tokens)
            text = answer(self.model, self.tokenizer, frames, context, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p)
            answers.append(cut_at_stops(text, until))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("fovlm answers one question per request (generate_until); multi-round "
                                  "generation is not supported")
