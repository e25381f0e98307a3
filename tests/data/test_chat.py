"""Chat rendering with the real SmolLM2 tokenizer: literal ids and roles, template agreement, truncation."""

import pytest

from fovlm.data.chat import (
    SYSTEM_PROMPT,
    ChatError,
    encode_preference,
    encode_sample,
    pretokenized_roles,
    render_chat,
    source_prompt,
)
from fovlm.data.roles import ROLE_ANSWER, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER
from fovlm.data.schema import parse_sample

S, U, T, A = ROLE_SYSTEM, ROLE_USER, ROLE_TEMPLATE, ROLE_ANSWER
IM_START, IM_END, NL = 1, 2, 198
# "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
SYSTEM_IDS = [IM_START, 9690, NL, 2683, 359, 253, 5356, 5646, 11173, 30, IM_END, NL]
ASSISTANT_HEADER = [IM_START, 520, 9531, NL]  # "<|im_start|>assistant\n"


def test_caption_sample_literal(tokenizer):
    sample = parse_sample({"source": "openvid", "media": "video", "caption": "A dog runs."}, "c")
    enc = encode_sample(tokenizer, sample, max_length=512)
    # user: "<|im_start|>user\nWrite a brief caption for this video.<|im_end|>\n" (the openvid prompt)
    user = [IM_START, 4093, NL, 19161, 253, 5453, 29892, 327, 451, 3341, 30, IM_END, NL]
    answer = [49, 2767, 7313, 30, IM_END]  # "A dog runs." + <|im_end|>
    assert enc.input_ids == SYSTEM_IDS + user + ASSISTANT_HEADER + answer + [NL]
    assert enc.roles == [S] * 12 + [U] * 13 + [T] * 4 + [A] * 5 + [T]
    assert not enc.truncated


def test_multi_turn_sft_literal(tokenizer):
    msgs = [
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "A round ball."},
    ]
    enc = encode_sample(
        tokenizer, parse_sample({"source": "x", "media": "image", "messages": msgs}, "m"), 512
    )
    user1 = [IM_START, 4093, NL, 43572, 47, IM_END, NL]  # "Colour?"
    answer1 = [12869, 30, IM_END]  # "Red." <|im_end|>
    user2 = [IM_START, 4093, NL, 31266, 47, IM_END, NL]  # "Shape?"
    answer2 = [49, 5075, 4405, 30, IM_END]  # "A round ball." <|im_end|>
    assert enc.input_ids == (
        SYSTEM_IDS + user1 + ASSISTANT_HEADER + answer1 + [NL] + user2 + ASSISTANT_HEADER + answer2 + [NL]
    )
    # Both assistant turns are answers, each with its closing <|im_end|>.
    assert enc.roles == ([S] * 12 + [U] * 7 + [T] * 4 + [A] * 3 + [T] + [U] * 7 + [T] * 4 + [A] * 5 + [T])


def test_preference_pair_literal(tokenizer):
    sample = parse_sample(
        {
            "source": "rlaif_v",
            "media": "image",
            "messages": [{"role": "user", "content": "Is it wet?"}],
            "chosen": "Yes.",
            "rejected": "No, dry.",
        },
        "p",
    )
    chosen, rejected = encode_preference(tokenizer, sample, 512)
    prompt = SYSTEM_IDS + [IM_START, 4093, NL, 4182, 357, 5793, 47, IM_END, NL] + ASSISTANT_HEADER
    assert chosen.input_ids == prompt + [10539, 30, IM_END, NL]  # "Yes."
    assert rejected.input_ids == prompt + [5230, 28, 3498, 30, IM_END, NL]  # "No, dry."
    prompt_roles = [S] * 12 + [U] * 9 + [T] * 4
    assert chosen.roles == prompt_roles + [A] * 3 + [T]
    assert rejected.roles == prompt_roles + [A] * 5 + [T]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?\n\nThink."},
            {"role": "assistant", "content": "4\n\nDone."},
        ],
        [
            {"role": "user", "content": "Caf\u00e9 \u2615 ok?"},
            {"role": "assistant", "content": "Oui, assistant!"},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "d"},
        ],
    ],
)
def test_rendering_equals_the_full_template(tokenizer, messages):
    ids, roles = render_chat(tokenizer, messages)
    turns = (
        messages
        if messages[0]["role"] == "system"
        else [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    )
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(roles) == len(ids)
    # The answer tokens decode back to exactly the assistant contents, each followed by <|im_end|>.
    spans, current = [], []
    for i, r in zip(ids, roles, strict=True):
        if r == A:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    assert [tokenizer.decode(s) for s in spans] == [
        m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"
    ]


def test_truncation_counted_and_answerless_skipped(tokenizer):
    sample = parse_sample({"source": "openvid", "media": "video", "caption": "A dog runs."}, "c")
    enc = encode_sample(tokenizer, sample, max_length=31)
    assert enc.truncated and len(enc.input_ids) == 31 and enc.roles[-2:] == [A, A]
    with pytest.raises(ChatError) as info:
        encode_sample(tokenizer, sample, max_length=29)  # ends with the assistant header: no answer left
    assert info.value.reason == "truncated_away"


def test_source_prompts():
    assert source_prompt("openvid") == "Write a brief caption for this video."
    assert source_prompt("WebVid") == "What would be the WebVid caption for this video?"
    assert source_prompt("vript_short") == "Provide a detailed narration of what happens in this video."
    assert source_prompt("sharegpt4video") == "Describe what happens in this video in detail."
    assert source_prompt("cauldron") == "Describe this."


def test_multiple_choice_and_legacy_layouts(tokenizer):
    mcq = parse_sample(
        {
            "source": "mvbench",
            "media": "video",
            "question": "How many?",
            "options": ["one", "two"],
            "answer": 1,
        },
        "q",
    )
    enc = encode_sample(tokenizer, mcq, 512)
    answer = [i for i, r in zip(enc.input_ids, enc.roles, strict=True) if r == A]
    assert tokenizer.decode(answer) == "B. two<|im_end|>"
    assert "How many?\nA. one\nB. two" in tokenizer.decode(enc.input_ids)
    # Reference raw user/assistant layout renders like the native messages.
    legacy = parse_sample({"user": "Colour?", "assistant": "Red.", "source": "x"}, "l", member_names=["jpg"])
    native = parse_sample(
        {
            "source": "x",
            "media": "image",
            "messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}],
        },
        "n",
    )
    assert encode_sample(tokenizer, legacy, 512) == encode_sample(tokenizer, native, 512)


def test_pretokenized_roles_from_markup(tokenizer):
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Ans."}]
    ids, roles = render_chat(tokenizer, msgs)
    # The fVLM original's all-ones mask (e.g. WebVid) still yields answer-only roles from the markup.
    sample = parse_sample(
        {"token_ids": ids, "loss_mask": [1] * len(ids), "source": "webvid"},
        "w",
        member_names=["000.jpg", "001.jpg"],
    )
    assert pretokenized_roles(tokenizer, ids, [1] * len(ids)) == roles
    assert encode_sample(tokenizer, sample, 512).roles == roles
    # Without markup the loss_mask decides.
    assert pretokenized_roles(tokenizer, [100, 101, 102], [0, 1, 1]) == [U, A, A]
