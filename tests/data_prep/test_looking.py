"""Cue-then-look clips: the ring marks one cell in the first second only, the shapes come after, and every answer,
option and rejected answer is what the decoded frames show in that cell and the others."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from prepkit import object_colour, object_pixels, object_shape, read_shards

from data_prep.cue_scenes import cell_box, render_cue_scene
from data_prep.looking import (
    COUNT_WORDS,
    LOOK_QUESTIONS,
    LookConfig,
    answer_region,
    answer_text,
    balanced_scenes,
    choice_options,
    question_text,
    scene_answer,
    values,
)
from data_prep.synthetic import SyntheticConfig, generate, set_items

SIZES = {"look_warmup": 4, "look_train": 6, "look_val": 0, "look_test": 8, "look_preference": 6, "look_reads": 2}
SETS = {"look_warmup/train": 4, "look_sft/train": 6, "look_mcq/test": 8, "look_preference/train": 6}
NOTHING_ELSE = {"caption_train": 0, "caption_val": 0, "sft_train": 0, "sft_val": 0, "text_train": 0, "text_val": 0,
                "preference_train": 0, "preference_val": 0, "mcq": 0}


@pytest.fixture(scope="module")
def looks(tmp_path_factory):
    out = tmp_path_factory.mktemp("looking")
    summary = generate(out, SyntheticConfig(seed=2, **NOTHING_ELSE, **SIZES), workers=0, progress=False)
    return summary, {name: read_shards(out / name) for name in SETS}


def _cells(frame: np.ndarray, grid: int) -> list[np.ndarray]:
    """The cells of a decoded [3, S, S] frame, row-major, each trimmed by a few pixels at its borders."""
    size = frame.shape[-1]
    out = []
    for index in range(grid * grid):
        x0, y0, x1, y1 = (round(v) for v in cell_box(grid, grid, index, size, size))
        out.append(frame[:, y0 + 3 : y1 - 3, x0 + 3 : x1 - 3])
    return out


def _ring_cell(frame: np.ndarray, grid: int) -> int:
    """The one cell that holds the white ring (near-white pixels) in a decoded cue frame."""
    white = [int(((c > 215).all(0)).sum()) for c in _cells(frame, grid)]
    assert sorted(white)[-2] == 0 and max(white) > 50, white  # white in exactly one cell
    return int(np.argmax(white))


def _read(frame: np.ndarray, grid: int) -> list[tuple[str, str] | None]:
    """(colour, shape) of every cell of a decoded frame after the cue (None: empty cell)."""
    return [(object_colour(c), object_shape(c)) if object_pixels(c).sum() > 30 else None for c in _cells(frame, grid)]


def _question_and_options(user: str) -> tuple[str, list[str]]:
    question, *lines = user.split("\n")
    return question, [line[3:] for line in lines]


def test_every_set_is_written_with_three_frames_and_its_region(looks):
    summary, sets = looks
    assert {name: info["samples"] for name, info in summary["sets"].items()} == SETS
    for name, samples in sets.items():
        for s in samples:
            assert s["frames"].shape[0] == 3 and s["json"]["duration"] == 3  # the cue second, then two of shapes
            cell = _ring_cell(s["frames"][0].numpy(), 2)
            box = [round(v, 6) for v in cell_box(2, 2, cell, 1.0, 1.0)]
            assert s["sample"].answer_region.box == tuple(box) and s["sample"].answer_region.start == 1.0, name


def test_answers_options_and_rejections_are_what_the_frames_show(looks):
    _, sets = looks
    checked = Counter()
    for name, samples in sets.items():
        for s in samples:
            frames, sample = s["frames"].numpy(), s["sample"]
            cue = _ring_cell(frames[0], 2)
            assert not (frames[1:] > 215).all(1).any(), "the ring is gone after the first second"
            cells = _read(frames[1], 2)
            assert cells == _read(frames[2], 2)  # the shapes stay put
            colour, shape = cells[cue]
            if name == "look_warmup/train":
                assert [c is not None for c in cells] == [i == cue for i in range(4)]  # only the ringed cell
            else:
                assert all(c is not None for c in cells) and len({c[0] for c in cells}) == 4  # four colours
            others = [c for i, c in enumerate(cells) if i != cue and c is not None]
            if sample.choice is not None:
                question, options, answer = sample.choice.question, list(sample.choice.options), None
                answer = options[sample.choice.answer]
            elif sample.chosen is not None:
                question, options = _question_and_options(sample.messages[0].content)
                answer = sample.chosen
            else:
                question, options = _question_and_options(sample.messages[0].content)
                answer = sample.messages[1].content
            category = next(c for c, q in LOOK_QUESTIONS.items() if q == question)
            right = answer_text(category, colour if category == "look_colour" else shape)
            assert answer == right, (name, s["key"])
            if options:
                assert right in options and len(set(options)) == len(options)
            if category == "look_colour" and options and others:  # wrong options: the colours of the other cells
                assert set(options) - {right} == {answer_text(category, c[0]) for c in others}
            if category == "look_shape" and others:  # every shape is on screen: seeing shapes is not enough
                assert {c[1] for c in cells} == {"circle", "square", "triangle"}
            if sample.chosen is not None:
                other_values = {answer_text(category, c[0] if category == "look_colour" else c[1]) for c in others}
                assert sample.rejected != right and (not other_values or sample.rejected in other_values)
            checked[category] += 1
    assert checked["look_colour"] >= 10 and checked["look_shape"] >= 10


def test_answers_are_balanced_and_cue_cells_vary():
    for kind in ("look_sft", "look_mcq", "look_preference", "look_warmup"):
        items = set_items(kind, "train", 120, SyntheticConfig(seed=1))
        answers: dict[str, Counter] = {}
        for item in items:
            text = item.record.text
            question = text.get("question") or text["messages"][0]["content"].split("\n")[0]
            answer = text["options"][text["answer"]] if "options" in text else text.get("chosen") or \
                text["messages"][1]["content"]
            answers.setdefault(question, Counter())[answer] += 1
        for question, counts in answers.items():
            category = next(c for c, q in LOOK_QUESTIONS.items() if q == question)
            assert set(counts) == {answer_text(category, v) for v in values(category)}, kind
            assert max(counts.values()) - min(counts.values()) <= 1, (kind, counts)
        assert set(Counter(item.scene.cue for item in items)) == {0, 1, 2, 3}


def test_a_three_by_three_grid_renders_what_it_describes():
    config = LookConfig(grid=3, reads=1, width=168)
    for _, scene in balanced_scenes(random.Random(4), config, 12):
        frames = render_cue_scene(scene).transpose(0, 3, 1, 2)  # [N, 3, H, W]
        assert _ring_cell(frames[0], 3) == scene.cue
        cells = _read(frames[-1], 3)
        assert [(i.colour, i.shape) for i in scene.items] == cells
        others = [c for i, (c, _) in enumerate(cells) if i != scene.cue]
        assert cells[scene.cue][0] not in others  # the ringed cell's colour is its own


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="grid"):
        LookConfig(grid=0)
    with pytest.raises(ValueError, match="reads"):
        SyntheticConfig(look_reads=0)


def test_families_without_a_ring_name_the_cell_or_count_the_colour():
    config = LookConfig(grid=3, reads=1, width=168)
    scenes = balanced_scenes(random.Random(5), config, 16, categories=("name_colour", "count_colour"))
    counts = set()
    for category, scene in scenes:
        frames = render_cue_scene(scene).transpose(0, 3, 1, 2)  # [N, 3, H, W]
        cells = _read(frames[0], 3)  # the shapes are there from the first frame: no ring
        assert [(i.colour, i.shape) for i in scene.items] == cells
        question, answer = question_text(category, scene), scene_answer(scene, category)
        options = choice_options(random.Random(0), scene, category)
        assert answer in options and len(set(options)) == len(options)
        if category == "name_colour":
            row, col = divmod(scene.cue, 3)
            assert question == f"What colour is the shape in row {row + 1}, column {col + 1}?"
            assert answer == f"{cells[scene.cue][0].capitalize()}."
            assert answer_region(scene, category)["from"] == 0.0
        else:
            colour = scene.target.colour
            assert question == f"How many shapes are {colour}?"
            count = sum(c == colour for c, _ in cells)
            assert answer == f"{COUNT_WORDS[count - 1]}."
            region = answer_region(scene, category)  # every cell, row-major: the places a count reads
            assert "box" not in region and region["from"] == 0.0 and len(region["spread"]) == 9
            assert region["spread"][5] == pytest.approx([2 / 3, 1 / 3, 1.0, 2 / 3], abs=1e-6)
            counts.add(count)
    assert counts == {1, 2, 3, 4}  # the answers cycle through every count
