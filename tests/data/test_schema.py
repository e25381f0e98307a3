"""The sample schema: native fields, the layouts of fVLM's original shards, and errors that name the key and the field."""

import json

import pytest

from fovlm.data.schema import (
    LAYOUT_CAPTION,
    LAYOUT_PREFERENCE,
    LAYOUT_PRETOKENIZED,
    LAYOUT_USER_ASSISTANT,
    Message,
    SampleError,
    frame_field,
    frame_fields,
    parse_sample,
    validate_key,
)


def test_native_caption_round_trip():
    raw = {
        "source": "openvid",
        "media": "video",
        "caption": "A dog runs.",
        "fps": 1.0,
        "duration": 12.5,
        "video_id": "abc",
    }
    sample = parse_sample(json.dumps(raw).encode(), "s000001")
    assert (sample.source, sample.media, sample.caption, sample.duration) == (
        "openvid",
        "video",
        "A dog runs.",
        12.5,
    )
    assert sample.to_json() == raw
    assert parse_sample(sample.to_json(), "s000001") == sample


def test_answer_region_round_trip():
    raw = {"source": "synthetic", "media": "video", "question": "Which?", "options": ["a", "b"], "answer": 1,
           "answer_region": {"box": [0.5, 0.0, 1.0, 0.5], "from": 1.0}}
    sample = parse_sample(raw, "k")
    assert sample.answer_region.box == (0.5, 0.0, 1.0, 0.5) and sample.answer_region.start == 1.0
    assert sample.to_json() == raw
    assert parse_sample({**raw, "answer_region": {"box": [0, 0, 1, 1]}}, "k").answer_region.start == 0.0
    spread = {**raw, "answer_region": {"spread": [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], "from": 0.0}}
    region = parse_sample(spread, "k").answer_region
    assert region.box is None and region.boxes == ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0))
    assert parse_sample(spread, "k").to_json() == spread


def test_native_messages_and_preference_and_choice():
    msgs = [
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Black."},
    ]
    sft = parse_sample({"source": "cauldron", "media": "image", "messages": msgs}, "k1")
    assert sft.messages[-1] == Message("assistant", "Black.") and not sft.is_preference
    pair = parse_sample(
        {"source": "rlaif_v", "media": "image", "messages": msgs[:1], "chosen": "Yes.", "rejected": "No."},
        "k2",
    )
    assert pair.is_preference and (pair.chosen, pair.rejected) == ("Yes.", "No.")
    mcq = parse_sample(
        {
            "source": "mvbench",
            "media": "video",
            "question": "Which?",
            "options": ["a", "b", "c"],
            "answer": 2,
            "category": "count",
        },
        "k3",
    )
    assert mcq.choice.answer == 2 and mcq.choice.options == ("a", "b", "c")
    assert parse_sample(pair.to_json(), "k2") == pair and parse_sample(mcq.to_json(), "k3") == mcq


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (
            {"source": "x", "media": "video", "messages": [{"role": "user", "content": "q"}]},
            "messages",
            "missing_text",
        ),
        ({"source": "x", "media": "movie", "caption": "c"}, "media", "invalid_json"),
        ({"source": "x", "messages": [{"role": "user", "content": "q"}]}, "media", "invalid_json"),
        ({"source": "x", "media": "text", "caption": "   "}, "caption", "empty_text"),
        (
            {"source": "x", "media": "text", "messages": [{"role": "bot", "content": "q"}]},
            "messages[0].role",
            "invalid_json",
        ),
        (
            {
                "source": "x",
                "media": "text",
                "messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}],
            },
            "messages[0].content",
            "empty_text",
        ),
        (
            {"source": "x", "media": "video", "question": "q", "options": ["a", "b"], "answer": 2},
            "answer",
            "invalid_json",
        ),
        ({"source": "x", "media": "video", "caption": "c", "duration": -1}, "duration", "invalid_json"),
        ({"media": "video", "caption": "c"}, "source", "invalid_json"),
        ({"source": "x", "media": "video", "caption": "c", "answer_region": {"box": [0.5, 0, 0.4, 1]}},
         "answer_region", "invalid_json"),
        ({"source": "x", "media": "video", "caption": "c", "answer_region": {"box": [0, 0, 1, 1], "from": -1}},
         "answer_region", "invalid_json"),
        ({"source": "x", "media": "video", "caption": "c", "answer_region": [0, 0, 1, 1]}, "answer_region",
         "invalid_json"),
        ({"source": "x", "media": "video", "caption": "c", "answer_region": {"spread": []}}, "answer_region",
         "invalid_json"),
        ({"source": "x", "media": "video", "caption": "c",
          "answer_region": {"box": [0, 0, 1, 1], "spread": [[0, 0, 1, 1]]}}, "answer_region", "invalid_json"),
        ({"source": "x", "media": "video", "caption": "c", "answer_region": {"spread": [[0, 0, 2, 1]]}},
         "answer_region", "invalid_json"),
        (
            {"source": "x", "media": "image", "messages": [{"role": "user", "content": "q"}], "chosen": "a"},
            "rejected",
            "missing_text",
        ),
        ({"token_ids": [1, 2, 3], "loss_mask": [0, 1]}, "loss_mask", "invalid_json"),
        ({"source": "x", "frame_count": 3}, "caption", "missing_text"),
    ],
)
def test_errors_name_key_and_field(raw, field, reason):
    with pytest.raises(SampleError) as info:
        parse_sample(raw, "bad_key_7")
    err = info.value
    assert err.key == "bad_key_7" and err.field == field and err.reason == reason
    assert "bad_key_7" in str(err) and repr(field) in str(err)


def test_invalid_bytes_and_keys():
    with pytest.raises(SampleError, match="not UTF-8") as info:
        parse_sample(b'{"caption": "\xff\xfe"}', "k")
    assert info.value.reason == "invalid_json"
    with pytest.raises(SampleError, match="not valid JSON"):
        parse_sample(b"{not json", "k")
    with pytest.raises(SampleError, match="dots"):
        validate_key("clip.v2")
    assert validate_key("shard00/clip_v2") == "shard00/clip_v2"


def test_reference_pretokenized_layout():
    raw = {"token_ids": [1, 9, 8, 2], "loss_mask": [0, 0, 1, 1], "source": "cauldron", "frame_count": 1}
    sample = parse_sample(raw, "c1", member_names=["000.jpg"])
    assert sample.layout == LAYOUT_PRETOKENIZED and sample.media == "image"
    assert sample.token_ids == (1, 9, 8, 2) and sample.loss_mask == (0, 0, 1, 1)
    assert parse_sample({**raw, "is_text_only": True}, "c2").media == "text"


def test_reference_raw_layouts():
    ua = parse_sample(
        {"user": "What is it?", "assistant": "A bird.", "source": "vript", "frame_count": 4},
        "v1",
        member_names=[frame_field(i) for i in range(4)],
    )
    assert ua.layout == LAYOUT_USER_ASSISTANT and ua.media == "video"
    assert ua.messages == (Message("user", "What is it?"), Message("assistant", "A bird."))
    # An empty user turn means the per-source prompt: the answer becomes a caption.
    empty_user = parse_sample(
        {"user": "", "assistant": "A bird.", "source": "vript"}, "v2", member_names=["mp4"]
    )
    assert empty_user.caption == "A bird." and empty_user.media == "video"
    cap = parse_sample(
        {"source": "openvid", "frame_count": 2},
        "o1",
        member_names=["000.jpg", "001.jpg", "txt"],
        txt=b"A caption from txt.\n",
    )
    assert cap.layout == LAYOUT_CAPTION and cap.caption == "A caption from txt."
    with pytest.raises(SampleError, match="not UTF-8") as info:
        parse_sample({"source": "openvid"}, "o2", member_names=["000.jpg", "txt"], txt=b"\xff\xfe bad")
    assert info.value.reason == "invalid_text" and info.value.field == "txt"
    dpo = parse_sample(
        {
            "user": "Describe.",
            "chosen_assistant": "Good.",
            "rejected_assistant": "Bad.",
            "source": "rlaif_v",
            "frame_count": 1,
        },
        "d1",
        member_names=["jpg"],
    )
    assert dpo.layout == LAYOUT_PREFERENCE and dpo.media == "image" and dpo.is_preference
    assert dpo.messages == (Message("user", "Describe."),)


def test_frame_fields_order():
    names = ["json", "010.jpg", "002.png", "001.jpg", "jpg", "mp4", "1.jpg"]
    assert frame_fields(names) == ["001.jpg", "002.png", "010.jpg"]
    with pytest.raises(ValueError):
        frame_field(1000)
