"""The SmolVLM2 baseline under fovlm's protocol, offline with a tiny random SmolVLM (no hub access)."""

import math

import pytest
import torch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from fovlm.data.roles import ROLE_ANSWER
from fovlm.eval.baseline import SmolVLMScorer
from fovlm.eval.questions import Question


@pytest.fixture(scope="module")
def tiny_smolvlm_dir(tmp_path_factory, tokenizer):
    """A random SmolVLM (SigLIP-like 1 layer at 224 px, Llama 2 layers) saved with its tokenizer and processor."""
    folder = tmp_path_factory.mktemp("smolvlm")
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": [
        "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]})
    config = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        scale_factor=4,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": 224},
                             max_image_size={"longest_edge": 224}).save_pretrained(folder)
    return folder


def _question(media: str, frames: int) -> Question:
    torch.manual_seed(1)
    return Question(
        key="q0", benchmark="toy", question="Which way does the ball move?", options=("left", "right", "up", "down"),
        answer=1, category="motion", frames=torch.randint(0, 256, (frames, 3, 224, 224), dtype=torch.uint8),
        media=media, times=tuple(float(t) + 0.5 for t in range(frames)) if media == "video" else None,
    )


@pytest.mark.parametrize("media,frames", [("video", 3), ("image", 8)])
def test_smolvlm_scores_match_full_sequences(tiny_smolvlm_dir, media, frames):
    scorer = SmolVLMScorer(str(tiny_smolvlm_dir))
    question = _question(media, frames)
    scores = scorer.score(question)
    assert scores.shape == (4,) and torch.isfinite(scores).all()

    # Independent check: each option as one full sequence without any cache, NLL by hand.
    pixels = scorer.pixel_inputs(question)
    image_token = scorer.tokenizer.convert_tokens_to_ids("<image>")
    expected_images = 1 if media == "image" else frames
    for index in range(4):
        ids, roles = _full_rendering(scorer, question, index)
        assert sum(1 for i in ids if i == image_token) == expected_images * scorer.image_seq_len
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([ids]), **pixels).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        answer = [j for j, r in enumerate(roles) if r == ROLE_ANSWER]
        assert scorer.tokenizer.decode([ids[answer[-1]]]) == "<end_of_utterance>"
        hand = -sum(float(logp[j - 1, ids[j]]) for j in answer) / len(answer)
        assert math.isclose(float(scores[index]), hand, rel_tol=1e-4)


def _full_rendering(scorer, question, index):
    """Prefix + option ids as the scorer lays them out, rebuilt from its split (prefix, option tokens)."""
    from fovlm.data.chat import choice_messages

    user_turn = choice_messages(question.question, question.options, None)[0]["content"]
    system = {"role": "system", "content": [{"type": "text", "text": scorer.system_prompt}]}
    user = {"role": "user", "content": scorer._media_content(question) + [{"type": "text", "text": user_turn}]}
    prompt = scorer._render([system, user]) + "Assistant:"
    answer = choice_messages(question.question, question.options, index)[1]["content"]
    prefix = scorer.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = scorer.tokenizer(f" {answer}<end_of_utterance>", add_special_tokens=False)["input_ids"]
    return prefix + tail, [0] * len(prefix) + [ROLE_ANSWER] * len(tail)


def test_baseline_results_sit_beside_the_modes(tiny_smolvlm_dir):
    from fovlm.eval.report import MultipleChoiceReport
    from fovlm.eval.run import evaluate_baseline

    scorer = SmolVLMScorer(str(tiny_smolvlm_dir))
    question = _question("video", 2)
    report = evaluate_baseline(scorer, {"toy": [question]}, MultipleChoiceReport())
    entry = report.compute()["toy"]["smolvlm2"]
    assert entry["total"] == 1 and entry["correct"] == int(int(scorer.score(question).argmin()) == question.answer)
    assert "smolvlm2" in report.table()
