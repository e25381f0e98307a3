"""The synthetic dataset: every set and split, real mp4s read back through decord, answers that match what
the frames show (colour, shape, direction measured on the decoded pixels), seeded, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prepkit import object_colour, object_pixels, object_shape, read_shards

from data_prep.cli import main
from data_prep.media import MediaOptions
from data_prep.synthetic import QUESTIONS, SyntheticConfig, alternatives, generate

NO_LOOK = {"look_warmup": 0, "look_train": 0, "look_val": 0, "look_test": 0, "look_preference": 0}
TINY = SyntheticConfig(seed=3, caption_train=6, caption_val=2, sft_train=9, sft_val=2, text_train=4, text_val=2,
                       preference_train=6, preference_val=2, mcq=8, multi_share=0.3, **NO_LOOK)


def _question(user: str, answer: str) -> str:
    """The bare question of an SFT user turn; a multiple-choice one must list the answer among 3-4 distinct
    lettered options, as the evaluator lays them out."""
    question, *lines = user.split("\n")
    if lines:
        assert len(lines) in (3, 4) and [line[:3] for line in lines] == [f"{x}. " for x in "ABCD"[:len(lines)]], user
        options = [line[3:] for line in lines]
        assert answer in options and len(set(options)) == len(options), user
    return question


SETS = {"caption/train": 6, "caption/val": 2, "sft/train": 9, "sft/val": 2, "text/train": 4, "text/val": 2,
        "preference/train": 6, "preference/val": 2, "mcq/test": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate(out, TINY, workers=0, progress=False)
    return out, summary, {name: read_shards(out / name) for name in SETS}


def _centre(frame: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(object_pixels(frame))
    return np.array([xs.mean(), ys.mean()])


def _direction(frames: np.ndarray) -> str:
    dx, dy = _centre(frames[-1]) - _centre(frames[0])
    if abs(dx) > abs(dy):
        return "to the right" if dx > 0 else "to the left"
    return "down" if dy > 0 else "up"


def test_every_set_and_split_is_written(tiny):
    out, summary, sets = tiny
    assert {name: info["samples"] for name, info in summary["sets"].items()} == SETS
    assert all(not info["skipped"] for info in summary["sets"].values())
    for name, samples in sets.items():
        assert len(samples) == SETS[name]
        for s in samples:
            if name.startswith("text"):
                assert s["sample"].media == "text" and s["frames"] is None and s["sample"].source == "synthetic_chat"
            else:
                # Real mp4s (kept by default), 4-8 s long: 4-8 frames at 1 FPS through decord.
                assert "mp4" in s["members"] and s["sample"].media == "video"
                assert 4 <= s["frames"].shape[0] <= 8 and s["frames"].shape[0] == round(s["json"]["duration"])
    assert summary["bytes"] < 2_000_000


def test_answers_match_what_the_frames_show(tiny):
    _, _, sets = tiny
    checked = 0
    for name in ("sft/train", "preference/train", "mcq/test"):
        for s in sets[name]:
            frames = s["frames"].numpy()  # [T, 3, 224, 224] uint8
            sample = s["sample"]
            if sample.choice is not None:
                pairs = [(sample.choice.question, sample.choice.options[sample.choice.answer])]
            elif sample.chosen is not None:
                question = _question(sample.messages[0].content, sample.chosen)
                pairs = [(question, sample.chosen)]
                assert sample.rejected != sample.chosen
                assert sample.rejected in alternatives(next(k for k, q in QUESTIONS.items() if q == question))
                if question != sample.messages[0].content:  # lettered: the rejected answer is one of the options
                    _question(sample.messages[0].content, sample.rejected)
            else:
                pairs = [(_question(q.content, a.content), a.content)
                         for q, a in zip(sample.messages[::2], sample.messages[1::2])]
            for question, answer in pairs:
                if question == QUESTIONS["colour"]:
                    assert answer == f"{object_colour(frames[0]).capitalize()}.", s["key"]
                elif question == QUESTIONS["direction"]:
                    assert answer == f"{_direction(frames).capitalize()}.", s["key"]
                elif question == QUESTIONS["shape"]:
                    assert answer == f"A {object_shape(frames[0])}.", s["key"]
                else:
                    assert question == QUESTIONS["count"]
                    continue
                checked += 1
    assert checked >= 15


def test_captions_name_the_object_and_its_motion(tiny):
    _, _, sets = tiny
    singles = [s for s in sets["caption/train"] + sets["caption/val"] if s["sample"].caption.startswith("A ")]
    assert singles
    for s in singles:
        frames = s["frames"].numpy()
        expected = f"A {object_colour(frames[0])} {object_shape(frames[0])} moves {_direction(frames)}."
        assert s["sample"].caption == expected


def test_sft_asks_both_bare_and_multiple_choice_questions():
    from data_prep.synthetic import set_items

    users = [m["content"] for item in set_items("sft", "train", 60, SyntheticConfig(seed=1))
             for m in item.record.text["messages"] if m["role"] == "user"]
    lettered = sum("\nA. " in u for u in users)
    assert 0.3 * len(users) < lettered < 0.7 * len(users)  # choice_share 0.5
    none = set_items("sft", "train", 20, SyntheticConfig(seed=1, choice_share=0.0))
    assert not any("\n" in m["content"] for item in none for m in item.record.text["messages"])


def test_look_questions_are_plain_unless_a_lettered_share_is_asked():
    from data_prep.synthetic import set_items

    def users(kind: str, config: SyntheticConfig) -> list[str]:
        return [m["content"] for item in set_items(kind, "train", 24, config)
                for m in item.record.text["messages"] if m["role"] == "user"]

    for kind in ("look_warmup", "look_sft", "look_preference"):
        assert not any("\n" in u for u in users(kind, SyntheticConfig(seed=1)))  # look_choice_share 0
        assert all("\nA. " in u for u in users(kind, SyntheticConfig(seed=1, look_choice_share=1.0)))
    with pytest.raises(ValueError, match="look_choice_share"):
        SyntheticConfig(look_choice_share=1.5)


def test_preference_pairs_cover_every_category_in_both_layouts():
    from data_prep.synthetic import set_items

    texts = [item.record.text for item in set_items("preference", "train", 80, SyntheticConfig(seed=1))]
    questions = [_question(t["messages"][0]["content"], t["chosen"]) for t in texts]
    assert set(questions) == set(QUESTIONS.values())
    lettered = [t for t in texts if "\nA. " in t["messages"][0]["content"]]
    assert 0.3 * len(texts) < len(lettered) < 0.7 * len(texts)  # choice_share 0.5, as in the SFT set
    for t in lettered:  # the rejected answer is another of the listed options
        _question(t["messages"][0]["content"], t["rejected"])


def test_multiple_choice_answers_are_balanced(tiny):
    _, _, sets = tiny
    choices = [s["sample"].choice for s in sets["mcq/test"]]
    assert {c.category for c in choices} == {"colour", "shape", "direction", "count"}
    assert all(len(c.options) in (3, 4) and 0 <= c.answer < len(c.options) for c in choices)
    assert len({c.answer for c in choices}) > 1  # the right option is not always in the same place


def test_same_seed_same_data_and_rerun_reuses_shards(tiny, tmp_path):
    out, _, _ = tiny
    config = SyntheticConfig(seed=3, caption_train=6, caption_val=0, sft_train=0, sft_val=0, text_train=4,
                             text_val=0, preference_train=0, preference_val=0, mcq=0, multi_share=0.3, **NO_LOOK)
    again = generate(tmp_path / "again", config, workers=0, progress=False)
    assert set(again["sets"]) == {"caption/train", "text/train"}
    for name in again["sets"]:
        # Equal bytes from a fresh temporary video folder: the data depends on the seed only.
        assert (tmp_path / "again" / name / "000000.tar").read_bytes() == (out / name / "000000.tar").read_bytes(), name
    rerun = generate(tmp_path / "again", config, workers=0, progress=False)
    manifest = json.loads((tmp_path / "again" / "caption" / "train" / "manifest.json").read_text())
    assert manifest["run"]["shards_written"] == 0 and manifest["run"]["shards_reused"] == ["000000.tar"]
    assert rerun["sets"]["caption/train"]["samples"] == 6
    other = generate(tmp_path / "other", SyntheticConfig(**{**vars(config), "seed": 4}), workers=0, progress=False)
    assert other["sets"]["caption/train"]["samples"] == 6
    assert (tmp_path / "other/caption/train/000000.tar").read_bytes() != (out / "caption/train/000000.tar").read_bytes()


def test_frames_option_and_command_line(tmp_path, capsys):
    code = main(["synthetic", "--output", str(tmp_path), "--caption-train", "3", "--caption-val", "1",
                 "--sft-train", "0", "--sft-val", "0", "--text-train", "2", "--text-val", "0",
                 "--preference-train", "0", "--preference-val", "0", "--mcq", "2", "--no-keep-mp4",
                 "--look-warmup", "0", "--look-train", "0", "--look-val", "0", "--look-test", "0", "--look-preference", "0",
                 "--size", "64", "--workers", "2", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sets"]["caption/train"]["samples"] == 3
    samples = read_shards(tmp_path / "caption" / "train")
    assert all("000.jpg" in s["members"] and "mp4" not in s["members"] for s in samples)
    assert MediaOptions().keep_mp4 is False  # dataset conversion keeps frames unless asked


def test_encoding_is_deterministic():
    import random

    from data_prep.scenes import encode_mp4, render_scene
    from data_prep.synthetic import make_scene

    frames = render_scene(make_scene(random.Random(1), SyntheticConfig()))
    assert len({encode_mp4(frames, 8) for _ in range(12)}) == 1


def test_answers_are_balanced_within_each_category():
    from collections import Counter

    from data_prep.synthetic import set_items

    for kind in ("sft", "preference", "mcq"):
        answers: dict[str, Counter] = {}
        for item in set_items(kind, "train", 240, SyntheticConfig(seed=1)):
            text = item.record.text
            if kind == "mcq":
                pairs = [(text["question"], text["options"][text["answer"]])]
            elif kind == "preference":
                pairs = [(_question(text["messages"][0]["content"], text["chosen"]), text["chosen"])]
            else:
                answer = text["messages"][1]["content"]
                pairs = [(_question(text["messages"][0]["content"], answer), answer)]
            for question, answer in pairs:
                answers.setdefault(question, Counter())[answer] += 1
        for question, counts in answers.items():
            category = next(c for c, q in QUESTIONS.items() if q == question)
            assert set(counts) == set(alternatives(category)), (kind, question)
            assert max(counts.values()) - min(counts.values()) <= 1, (kind, question, counts)
