"""Option layout and prefix-shared scoring against hand computations (tiny random Llama, real tokenizer)."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from fovlm.data.chat import render_chat
from fovlm.data.roles import IGNORE_INDEX, ROLE_ANSWER, ROLE_TEMPLATE, ROLE_USER
from fovlm.eval.questions import render_options, split_options
from fovlm.eval.scoring import hf_step, nll_from_full_logits, score_on_prefix
from fovlm.model.loading import tiny_llm_config

QUESTION = "What colour is the ball?"
OPTIONS = ("red", "a bright green ball", "blue")


def test_split_options_layout():
    rows = [
        ([5, 6, 7, 10, 11, 2, 9], [ROLE_USER] * 3 + [ROLE_ANSWER] * 3 + [ROLE_TEMPLATE]),
        ([5, 6, 7, 12, 2, 9], [ROLE_USER] * 3 + [ROLE_ANSWER] * 2 + [ROLE_TEMPLATE]),
    ]
    opts = split_options(rows)
    assert opts.prefix_ids.tolist() == [5, 6, 7]
    assert opts.first_targets.tolist() == [10, 12]
    # position j predicts token j+1 when that token is an answer token; "\n" after <|im_end|> is not scored, so
    # positions from the last answer token on predict nothing and are not run
    assert opts.option_ids.tolist() == [[10, 11], [12, 2]]
    assert opts.option_mask.tolist() == [[1, 1], [1, 1]]
    assert opts.option_labels.tolist() == [[11, 2], [2, IGNORE_INDEX]]
    assert opts.num_targets.tolist() == [3, 2]


def test_split_options_rejects_different_prompts():
    rows = [([5, 6, 10], [ROLE_USER, ROLE_USER, ROLE_ANSWER]), ([5, 7, 10], [ROLE_USER, ROLE_USER, ROLE_ANSWER])]
    with pytest.raises(ValueError, match="does not share"):
        split_options(rows)


def test_render_options_prefix_is_the_generation_prompt(tokenizer):
    opts = render_options(tokenizer, QUESTION, OPTIONS)
    prefix = tokenizer.decode(opts.prefix_ids)
    assert prefix.endswith("<|im_start|>assistant\n") and "C. blue" in prefix
    for i, option in enumerate(OPTIONS):
        text = tokenizer.decode(opts.option_ids[i][opts.option_mask[i].bool()])
        # each option runs its own tokens up to its last predicting position (padded to the longest one)
        assert f"{'ABC'[i]}. {option}<|im_end|>\n".startswith(text) and text.startswith(f"{'ABC'[i]}.")
        assert tokenizer.decode(opts.full_ids[i][opts.full_roles[i] == ROLE_ANSWER]) == f"{'ABC'[i]}. {option}<|im_end|>"


def test_prefix_shared_nll_equals_hand_computation(tokenizer):
    llm = LlamaForCausalLM(tiny_llm_config()).eval()
    opts = render_options(tokenizer, QUESTION, OPTIONS)
    with torch.no_grad():
        prefix = llm(input_ids=opts.prefix_ids[None], use_cache=True, past_key_values=DynamicCache())
        shared = score_on_prefix(
            hf_step(llm), prefix.past_key_values, len(opts.prefix_ids), prefix.logits[0, -1], opts
        )
        full = nll_from_full_logits(llm(input_ids=opts.full_ids).logits, opts.full_labels)
        for i, option in enumerate(OPTIONS):
            ids, roles = render_chat(tokenizer, [
                {"role": "user", "content": QUESTION + "\n" + "\n".join(
                    f"{'ABC'[j]}. {o}" for j, o in enumerate(OPTIONS))},
                {"role": "assistant", "content": f"{'ABC'[i]}. {option}"},
            ])
            logp = torch.log_softmax(llm(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            answer = [j for j, r in enumerate(roles) if r == ROLE_ANSWER]
            assert tokenizer.decode([ids[answer[-1]]]) == "<|im_end|>"
            hand = -sum(float(logp[j - 1, ids[j]]) for j in answer) / len(answer)
            assert math.isclose(float(shared[i]), hand, rel_tol=1e-5)
            assert math.isclose(float(full[i]), hand, rel_tol=1e-5)


def test_text_answer_format_scores_the_option_text_alone(tokenizer):
    opts = render_options(tokenizer, QUESTION, OPTIONS, answer_format="text")
    assert "B. a bright green ball" in tokenizer.decode(opts.prefix_ids)  # the question still lists the letters
    for i, option in enumerate(OPTIONS):
        answer = opts.full_ids[i][opts.full_roles[i] == ROLE_ANSWER]
        assert tokenizer.decode(answer) == f"{option}<|im_end|>"
    with pytest.raises(ValueError, match="answer_format"):
        render_options(tokenizer, QUESTION, OPTIONS, answer_format="number")


def test_cloze_answer_format_asks_the_plain_question(tokenizer):
    opts = render_options(tokenizer, QUESTION, OPTIONS, answer_format="cloze")
    for i, option in enumerate(OPTIONS):
        ids, roles = render_chat(tokenizer, [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": option}])
        full = opts.full_ids[i][: len(ids)]
        assert full.tolist() == ids and (opts.full_roles[i][: len(ids)] == torch.tensor(roles)).all()
    assert "B." not in tokenizer.decode(opts.prefix_ids)

