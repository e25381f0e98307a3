"""Baseline: a Hugging Face SmolVLM2 model scored with fovlm's multiple-choice protocol and frames.

SmolVLM2's published benchmark numbers come from its own protocol; to compare fairly, this scorer gives a
SmolVLM2 checkpoint (``AutoModelForImageTextToText``) the very frames fovlm sees (same selection, same
crop), asks the same question with the same lettered options and system prompt, and ranks the options by
the same mean answer-token NLL (answer text and the closing ``<end_of_utterance>``), sharing the prompt's
KV cache across options exactly as :mod:`fovlm.eval.scoring` does.

The prompt follows SmolVLM2's own layout, built here from transformers' SmolVLM pieces (its chat template,
video intro, per-frame timestamps and image-token expansion): ``SmolVLMProcessor`` itself cannot be built
without torchvision (its video processor needs it), so the image processor, the tokenizer and the prompt
builder are used directly. A video is given as its frames with their timestamps, as SmolVLM2's video
processor would present them; a single image is given once. Image splitting is off for both, so every frame
costs ``image_seq_len`` tokens.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, DynamicCache
from transformers.models.smolvlm.processing_smolvlm import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_MEDIA_OUTTRO,
    DEFAULT_VIDEO_INTRO,
    FRAME_TIMESTAMP_MESSAGE,
    _prompt_single_image,
)

from fovlm.data.chat import SYSTEM_PROMPT, choice_messages
from fovlm.data.roles import ROLE_ANSWER, ROLE_USER
from fovlm.eval.questions import Question, split_options
from fovlm.eval.scoring import hf_step, score_on_prefix

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


def _image_seq_len(config) -> int:
    """Tokens per image after SmolVLM's pixel shuffle: (image_size / patch_size)^2 / scale_factor^2."""
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)


class SmolVLMScorer:
    """Scores multiple-choice questions with a SmolVLM2 checkpoint (hub id or local folder).

    Args:
        name_or_path: SmolVLM2 model id or folder (model, tokenizer and image processor).
        dtype: parameter dtype.
        device: where the model runs.
        system_prompt: the system turn; fovlm's by default so both models read the same prompt.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        system_prompt: str = SYSTEM_PROMPT,
    ) -> None:
        self.name = str(name_or_path)
        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.system_prompt = system_prompt
        self.image_seq_len = _image_seq_len(self.model.config)
        missing = [t for t in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN)
                   if t not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"{self.name}: the tokenizer lacks SmolVLM's image tokens {missing}")

    def _media_content(self, question: Question) -> list[dict]:
        """SmolVLM2's user-turn media: one image, or the frames with their timestamps as its video prompt."""
        if question.media == "image":
            return [{"type": "image"}]
        count = question.frames.shape[0]
        times = question.times or tuple(float(t) for t in range(count))
        duration = timedelta(seconds=int(max(times[-1], count - 1)) + 1)
        from num2words import num2words

        content = [{"type": "text", "text": DEFAULT_VIDEO_INTRO.format(frame_count=num2words(count),
                                                                       video_duration=str(duration))}]
        for t in times:
            content.append({"type": "text", "text": FRAME_TIMESTAMP_MESSAGE.format(
                timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}")})
            content.append({"type": "image"})
        content.append({"type": "text", "text": DEFAULT_MEDIA_OUTTRO})
        return content

    def _render(self, messages: list[dict]) -> str:
        text = self.tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
        expanded = _prompt_single_image(self.image_seq_len, fake_token_around_image=FAKE_IMAGE_TOKEN,
                                        image_token=IMAGE_TOKEN, global_image_token=GLOBAL_IMAGE_TOKEN)
        return text.replace(IMAGE_TOKEN, expanded)

    def pixel_inputs(self, question: Question) -> dict[str, Tensor]:
        """The image processor's tensors for the question's frames (one image for an image question)."""
        frames = question.frames[:1] if question.media == "image" else question.frames
        images = [Image.fromarray(f.permute(1, 2, 0).contiguous().numpy()) for f in frames]
        out = self.image_processor(images=[images], do_image_splitting=False, return_tensors="pt")
        return {k: v.to(self.device) for k, v in out.items() if k in ("pixel_values", "pixel_attention_mask")}

    @torch.no_grad()
    def score(self, question: Question) -> Tensor:
        """Mean answer-token NLL per option (float32 [n]); the lowest is the prediction."""
        user_turn, = choice_messages(question.question, question.options, None)
        system = {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}
        user = {"role": "user", "content": self._media_content(question)
                + [{"type": "text", "text": user_turn["content"]}]}
        prompt = self._render([system, user]) + "Assistant:"
        prefix_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows = []
        for index in range(len(question.options)):
            answer = choice_messages(question.question, question.options, index)[1]["content"]
            full = self._render([system, user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
            if not full.startswith(prompt):
                raise ValueError(f"{self.name}: the chat template does not extend the generation prompt")
            answer_text = full[len(prompt):].rstrip("\n")  # " B. text<end_of_utterance>"
            answer_ids = self.tokenizer(answer_text, add_special_tokens=False)["input_ids"]
            rows.append((prefix_ids + answer_ids, [ROLE_USER] * len(prefix_ids) + [ROLE_ANSWER] * len(answer_ids)))
        options = split_options(rows, pad_id=self.tokenizer.pad_token_id or 0)
        input_ids = options.prefix_ids[None].to(self.device)  # [1, P]
        out = self.model(input_ids=input_ids, use_cache=True, past_key_values=DynamicCache(),
                         **self.pixel_inputs(question))
        return score_on_prefix(hf_step(self.model), out.past_key_values, input_ids.shape[1],
                               out.logits[0, -1], options)
