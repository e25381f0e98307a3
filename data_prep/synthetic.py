"""The synthetic demo dataset: seeded scenes of coloured shapes moving over textured backgrounds, encoded as
real ``.mp4`` files and converted through the same decord path as any downloaded dataset.

Shard sets written under the output folder (each with its own ``manifest.json``; a summary
``manifest.json`` at the top):

| folder | stage | samples |
|---|---|---|
| ``caption/{train,val}`` | 1 | ``caption``: "A red circle moves to the left." |
| ``sft/{train,val}`` | 2 | ``messages``: 1-3 question/answer turns about the clip (colour, shape, direction, count), about half with lettered options |
| ``text/{train,val}`` | 1-2 | ``messages`` without media (arithmetic, colour mixing, opposites), source ``synthetic_chat`` |
| ``preference/{train,val}`` | 3 | ``messages`` = one question (colour, shape, direction, count; about half with lettered options), ``chosen`` = the right answer, ``rejected`` = a wrong one |
| ``mcq/test`` | eval | ``question``, ``options``, ``answer`` (index), ``category`` (colour, shape, direction, count) |

Made to be learnable on a laptop CPU in minutes (docs/measured.md#learning-in-minutes-on-a-cpu): most
scenes hold one large object whose colour, shape and direction of motion are the answers, the text between
the frames and the answer is short, and every answer depends on the video (each question's answers are
balanced over the possible values, so the text prior alone is at chance). Clips last 4-8 s, so they give
4-8 frames at 1 FPS. Every split draws from its own seeded random stream, so train, val and test scenes
differ and the same seed gives the same dataset.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from data_prep import looking
from data_prep.cue_scenes import CueScene, render_cue_scene
from data_prep.looking import LookConfig
from data_prep.media import MediaOptions
from data_prep.records import Record, build_record
from data_prep.scenes import COLOURS, DIRECTIONS, SHAPES, TEXTURES, Scene, Shape, encode_mp4, render_scene
from data_prep.writer import Built, write_shards
from fovlm.data.chat import choice_messages

SOURCE = "synthetic"
CHAT_SOURCE = "synthetic_chat"
LOOK_SOURCE = "synthetic_look"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTION_TEXT = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "direction": "Which way does it move?",
    "count": "How many shapes are there?",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic dataset (samples per set and split) and of its clips.

    Args:
        seed: seed of every random stream (same seed, same dataset).
        caption_train: stage-1 caption samples (training split).
        caption_val: stage-1 caption samples (validation split).
        sft_train: stage-2 question-answer samples (training split).
        sft_val: stage-2 question-answer samples (validation split).
        text_train: text-only chat samples (training split).
        text_val: text-only chat samples (validation split).
        preference_train: stage-3 preference pairs (training split).
        preference_val: stage-3 preference pairs (validation split).
        mcq: multiple-choice evaluation questions.
        min_seconds: shortest clip (whole seconds, so a clip of n seconds gives n frames at 1 FPS).
        max_seconds: longest clip.
        width: clip width in pixels (even).
        height: clip height in pixels (even).
        clip_fps: frame rate the clips are encoded at.
        multi_share: share of scenes with 2-4 smaller objects (the count questions); the rest hold one.
        choice_share: share of SFT and preference questions asked with lettered options (the multiple-choice
            layout of ``fovlm eval``), answered with the option text.
        look_warmup: cue-then-look SFT clips with only the ringed cell filled (the warm-up, see
            :mod:`data_prep.looking`).
        look_train: cue-then-look SFT clips with every cell filled (training split).
        look_val: the same, validation split.
        look_test: cue-then-look multiple-choice questions (``look_colour`` and ``look_shape``).
        look_preference: cue-then-look preference pairs (the rejected answer is another cell's).
        look_grid: cells per side of the cue-then-look grid.
        look_reads: seconds (frames at 1 FPS) of shapes after the one-second cue.
        look_categories: the cue-then-look question families asked, comma-separated (look_colour, look_shape,
            name_colour, count_colour; see :mod:`data_prep.looking`).
        look_choice_share: share of cue-then-look SFT and preference questions asked with lettered options
            (0 by default: the plain question, as ``fovlm eval --answer-format cloze`` asks it).
    """

    seed: int = 0
    caption_train: int = 512
    caption_val: int = 16
    sft_train: int = 512
    sft_val: int = 16
    text_train: int = 64
    text_val: int = 8
    preference_train: int = 256
    preference_val: int = 8
    mcq: int = 200
    min_seconds: int = 4
    max_seconds: int = 8
    width: int = 112
    height: int = 112
    clip_fps: int = 8
    multi_share: float = 0.2
    choice_share: float = 0.5
    look_warmup: int = 600
    look_train: int = 1600
    look_val: int = 16
    look_test: int = 400
    look_preference: int = 128
    look_grid: int = 2
    look_reads: int = 1
    look_categories: str = "look_colour,look_shape"
    look_choice_share: float = 0.0

    def __post_init__(self):
        if not 1 <= self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 1 <= min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.width % 2 or self.height % 2:
            raise ValueError(f"width and height must be even (yuv420p), got {self.width}x{self.height}")
        if not 0.0 <= self.multi_share <= 1.0:
            raise ValueError(f"multi_share must be in [0, 1], got {self.multi_share}")
        for name in ("choice_share", "look_choice_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.look()  # checks the cue-then-look settings
        unknown = set(self.look_category_names) - set(looking.LOOK_CATEGORIES)
        if unknown or not self.look_category_names:
            raise ValueError(f"look_categories must name some of {looking.LOOK_CATEGORIES}, got {self.look_categories!r}")

    @property
    def look_category_names(self) -> tuple[str, ...]:
        """``look_categories`` as a tuple of names."""
        return tuple(name.strip() for name in self.look_categories.split(",") if name.strip())

    def look(self) -> LookConfig:
        """The cue-then-look clip settings (same frame size and rate as the other clips)."""
        return LookConfig(grid=self.look_grid, reads=self.look_reads, width=self.width, clip_fps=self.clip_fps)


# -- scenes --------------------------------------------------------------------------------------------


def _shape(rng: random.Random, size: float, travel: float, colour: str, direction: str) -> Shape:
    """A shape that stays fully inside the frame over the whole clip."""
    dx, dy = DIRECTIONS[direction]
    lo, hi = size, 1.0 - size  # centre range (fractions of the side; frames are square or near-square)
    def axis(d: float) -> float:
        if d > 0:
            return rng.uniform(lo, max(lo, hi - travel))
        if d < 0:
            return rng.uniform(min(hi, lo + travel), hi)
        return rng.uniform(lo, hi)
    return Shape(rng.choice(SHAPES), colour, axis(dx), axis(dy), size, direction, travel)


def make_scene(rng: random.Random, config: SyntheticConfig, count: int | None = None,
               colour: str | None = None, direction: str | None = None, shape: str | None = None) -> Scene:
    """A random scene; ``count`` objects (1: one large object), optionally with a given colour/direction/shape
    for the first object (used to balance the answers)."""
    if count is None:
        count = rng.choice((2, 3, 4)) if rng.random() < config.multi_share else 1
    colours = rng.sample(list(COLOURS), count)
    if colour is not None:
        colours = [colour] + [c for c in colours if c != colour][: count - 1]
    shapes = []
    for i in range(count):
        size = rng.uniform(0.2, 0.26) if count == 1 else rng.uniform(0.09, 0.12)
        travel = rng.uniform(0.3, 0.42) if count == 1 else rng.uniform(0.2, 0.3)
        d = direction if (i == 0 and direction is not None) else rng.choice(list(DIRECTIONS))
        s = _shape(rng, size, travel, colours[i], d)
        if i == 0 and shape is not None:
            s = Shape(shape, s.colour, s.x, s.y, s.size, s.direction, s.travel)
        shapes.append(s)
    tint = [rng.randint(-15, 15) for _ in range(3)]
    grey = rng.randint(100, 160)
    return Scene(
        shapes=tuple(shapes),
        texture=rng.choice(TEXTURES),
        background=tuple(grey + t for t in tint),  # type: ignore[arg-type]
        duration=float(rng.randint(config.min_seconds, config.max_seconds)),
        fps=config.clip_fps,
        width=config.width,
        height=config.height,
        texture_seed=rng.randrange(2**31),
    )


# -- texts ---------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        return f"A {s.colour} {s.shape} moves {DIRECTION_TEXT[s.direction]}."
    parts = [f"a {s.colour} {s.shape}" for s in scene.shapes]
    return f"{NUMBERS[len(parts)].capitalize()} shapes move: {', '.join(parts[:-1])} and {parts[-1]}."


def answer(scene: Scene, category: str) -> str:
    """The short answer to ``QUESTIONS[category]`` about ``scene`` (one-object scenes for all but count)."""
    s = scene.shapes[0]
    if category == "colour":
        return f"{s.colour.capitalize()}."
    if category == "shape":
        return f"A {s.shape}."
    if category == "direction":
        return f"{DIRECTION_TEXT[s.direction].capitalize()}."
    if category == "count":
        return f"{NUMBERS[len(scene.shapes)].capitalize()}."
    raise ValueError(f"unknown category {category!r}")


def alternatives(category: str) -> list[str]:
    """Every value a category's answer can take (the options of a multiple-choice question)."""
    if category == "colour":
        return [f"{c.capitalize()}." for c in COLOURS]
    if category == "shape":
        return [f"A {s}." for s in SHAPES]
    if category == "direction":
        return [f"{DIRECTION_TEXT[d].capitalize()}." for d in DIRECTIONS]
    if category == "count":
        return [f"{NUMBERS[n].capitalize()}." for n in (1, 2, 3, 4)]
    raise ValueError(f"unknown category {category!r}")


def choice_options(rng: random.Random, category: str, right: str) -> list[str]:
    """Four shuffled options of a multiple-choice question: the right answer and three wrong ones."""
    options = alternatives(category)
    rng.shuffle(options)
    if len(options) > 4:
        options = [right] + [o for o in options if o != right][:3]
        rng.shuffle(options)
    return options


def _balanced_scene(rng: random.Random, config: SyntheticConfig, category: str, index: int) -> Scene:
    """A scene whose answer to ``category`` cycles through the possible values (balanced answers)."""
    if category == "count":
        return make_scene(rng, config, count=1 + index % 4)
    value_lists = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}
    value = value_lists[category][index % len(value_lists[category])]
    return make_scene(rng, config, count=1, **{category: value})


def chat_turn(rng: random.Random) -> tuple[str, str]:
    """One text-only question and its answer."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a + b].capitalize()}."
    if kind == 1:
        pair, result = rng.choice([(("blue", "yellow"), "Green"), (("red", "yellow"), "Orange"),
                                   (("red", "blue"), "Purple")])
        first, second = rng.sample(pair, 2)
        return f"Which colour do you get by mixing {first} and {second}?", f"{result}."
    if kind == 2:
        word, opposite = rng.choice([("left", "right"), ("right", "left"), ("up", "down"), ("down", "up")])
        return f"What is the opposite of {word}?", f"{opposite.capitalize()}."
    shape, sides = rng.choice([("triangle", 3), ("square", 4)])
    return f"How many sides does a {shape} have?", f"{NUMBERS[sides].capitalize()}."


# -- items ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticItem:
    """A record plus the scene to render into its video file first (None for text-only records)."""

    record: Record
    scene: Scene | CueScene | None = None

    @property
    def item(self) -> str:
        return self.record.item


def build_synthetic(key: str, item: SyntheticItem, options: MediaOptions, raw_dir: str) -> Built:
    """Render and encode the scene to its ``.mp4`` under ``raw_dir`` (once), then convert that file like any
    dataset's video. Record video paths are relative to ``raw_dir``, so the items (and thus the shard
    fingerprints) do not depend on where the videos are kept."""
    record = item.record
    if item.scene is not None:
        assert record.video is not None
        path = Path(raw_dir) / record.video
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".mp4.partial")
            frames = render_cue_scene(item.scene) if isinstance(item.scene, CueScene) else render_scene(item.scene)
            tmp.write_bytes(encode_mp4(frames, item.scene.fps))
            tmp.replace(path)
        record = replace(record, video=str(path))
    return build_record(key, record, options)


def _video_item(name: str, scene: Scene | CueScene, text: dict[str, Any], video_dir: str,
                meta: dict[str, Any] | None = None, source: str = SOURCE) -> SyntheticItem:
    record = Record(name, source, "video", text, video=f"{video_dir}/{name}.mp4",
                    meta={"video_id": name, **(meta or {})})
    return SyntheticItem(record, scene)


def _asked(rng: random.Random, share: float, question: str, options: list[str]) -> str:
    """``question``, in the evaluator's lettered layout (with ``options``) for a ``share`` of questions."""
    if rng.random() < share:
        return choice_messages(question, options, None)[0]["content"]
    return question


def look_items(kind: str, split: str, n: int, config: SyntheticConfig) -> list[SyntheticItem]:
    """The items of a cue-then-look set (``kind`` in look_warmup, look_sft, look_preference, look_mcq)."""
    video_dir = f"{kind}/{split}"
    rng = random.Random(f"{config.seed}/{kind}/{split}")
    items = []
    scenes = looking.balanced_scenes(rng, config.look(), n, distractors=kind != "look_warmup",
                                     categories=config.look_category_names)
    for i, (category, scene) in enumerate(scenes):
        name = f"{kind}_{split}_{i:05d}"
        right = looking.scene_answer(scene, category)
        question = looking.question_text(category, scene)
        if kind == "look_mcq":
            options = looking.choice_options(rng, scene, category)
            text = {"question": question, "options": options, "answer": options.index(right), "category": category}
        elif kind == "look_preference":
            asked = _asked(rng, config.look_choice_share, question, looking.choice_options(rng, scene, category))
            text = {"messages": [{"role": "user", "content": asked}], "chosen": right,
                    "rejected": looking.wrong_answer(rng, scene, category)}
        elif kind in ("look_warmup", "look_sft"):
            asked = _asked(rng, config.look_choice_share, question, looking.choice_options(rng, scene, category))
            text = {"messages": [{"role": "user", "content": asked}, {"role": "assistant", "content": right}]}
        else:
            raise ValueError(f"unknown cue-then-look set {kind!r}")
        region = looking.answer_region(scene, category)
        items.append(_video_item(name, scene, text, video_dir, {"answer_region": region},
                                 source=LOOK_SOURCE))
    return items


def set_items(kind: str, split: str, n: int, config: SyntheticConfig) -> list[SyntheticItem]:
    """The items of one shard set (``kind`` in caption, sft, text, preference, mcq, and the cue-then-look
    sets of :func:`look_items`)."""
    if kind.startswith("look_"):
        return look_items(kind, split, n, config)
    video_dir = f"{kind}/{split}"
    rng = random.Random(f"{config.seed}/{kind}/{split}")
    items: list[SyntheticItem] = []
    single = ["colour", "shape", "direction"]
    seen: Counter = Counter()  # questions per category so far: balances each category's answers

    def balanced(category: str) -> Scene:
        seen[category] += 1
        return _balanced_scene(rng, config, category, seen[category] - 1)

    for i in range(n):
        name = f"{kind}_{split}_{i:05d}"
        if kind == "caption":
            scene = make_scene(rng, config)
            items.append(_video_item(name, scene, {"caption": caption(scene)}, video_dir))
        elif kind == "sft":
            # Count questions on the multi-object share of scenes; the others cycle through the categories.
            category = "count" if rng.random() < config.multi_share else single[i % 3]
            scene = balanced(category)
            asked = [category] if category == "count" else [category] + rng.sample(
                [c for c in single if c != category], rng.randint(0, 2))
            messages = []
            for c in asked:
                question = QUESTIONS[c]
                if rng.random() < config.choice_share:
                    # The evaluator's layout (lettered options under the question); the answer is the option
                    # text, what `fovlm eval --answer-format text` scores.
                    options = choice_options(rng, c, answer(scene, c))
                    question = choice_messages(question, options, None)[0]["content"]
                messages += [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer(scene, c)}]
            items.append(_video_item(name, scene, {"messages": messages}, video_dir))
        elif kind == "preference":
            category = (single + ["count"])[i % 4]
            scene = balanced(category)
            right = answer(scene, category)
            question = QUESTIONS[category]
            if rng.random() < config.choice_share:  # the SFT questions' lettered layout, as in stage 2
                options = choice_options(rng, category, right)
                wrong = rng.choice([o for o in options if o != right])
                question = choice_messages(question, options, None)[0]["content"]
            else:
                wrong = rng.choice([a for a in alternatives(category) if a != right])
            text = {"messages": [{"role": "user", "content": question}], "chosen": right, "rejected": wrong}
            items.append(_video_item(name, scene, text, video_dir))
        elif kind == "mcq":
            category = (single + ["count"])[i % 4]
            scene = balanced(category)
            options = choice_options(rng, category, answer(scene, category))
            text = {"question": QUESTIONS[category], "options": options,
                    "answer": options.index(answer(scene, category)), "category": category}
            items.append(_video_item(name, scene, text, video_dir))
        elif kind == "text":
            messages = []
            for _ in range(1 + (rng.random() < 0.3)):
                q, a = chat_turn(rng)
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            items.append(SyntheticItem(Record(name, CHAT_SOURCE, "text", {"messages": messages})))
        else:
            raise ValueError(f"unknown set {kind!r}")
    return items


def generate(
    output: str | Path,
    config: SyntheticConfig | None = None,
    options: MediaOptions | None = None,
    *,
    workers: int = 1,
    samples_per_shard: int = 1000,
    raw_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every synthetic shard set under ``output`` and return the summary manifest.

    ``options`` default to keeping each clip's ``.mp4`` (checked through decord): a few MB in all, against
    about 15 MB as 224 px JPEG frames (``MediaOptions(keep_mp4=False)``).

    ``raw_dir``: keep the generated ``.mp4`` files there (default: a temporary folder, deleted at the end;
    the shards hold the sampled frames, so the videos are not needed afterwards)."""
    output = Path(output)
    config = config or SyntheticConfig()
    options = options or MediaOptions(keep_mp4=True)
    sets = [("caption", "train", config.caption_train), ("caption", "val", config.caption_val),
            ("sft", "train", config.sft_train), ("sft", "val", config.sft_val),
            ("text", "train", config.text_train), ("text", "val", config.text_val),
            ("preference", "train", config.preference_train), ("preference", "val", config.preference_val),
            ("mcq", "test", config.mcq), ("look_warmup", "train", config.look_warmup),
            ("look_sft", "train", config.look_train), ("look_sft", "val", config.look_val),
            ("look_preference", "train", config.look_preference), ("look_mcq", "test", config.look_test)]
    temporary = raw_dir is None
    raw = Path(tempfile.mkdtemp(prefix="fovlm_synthetic_")) if temporary else Path(raw_dir)
    build = functools.partial(build_synthetic, options=options, raw_dir=str(raw))
    summary: dict[str, Any] = {"config": asdict(config), "options": asdict(options), "sets": {}}
    try:
        for kind, split, n in sets:
            if n <= 0:
                continue
            items = set_items(kind, split, n, config)
            manifest = write_shards(items, output / kind / split, build, (config, options),
                                    samples_per_shard=samples_per_shard, workers=workers, progress=progress,
                                    description=f"{kind}/{split}", info={"source": SOURCE, "set": kind,
                                                                        "split": split})
            summary["sets"][f"{kind}/{split}"] = {
                "samples": manifest["samples"], "skipped": manifest["skipped"],
                "frame_histogram": manifest["frame_histogram"],
                "shards": [f"{kind}/{split}/{s['name']}" for s in manifest["shards"]],
            }
    finally:
        if temporary:
            shutil.rmtree(raw, ignore_errors=True)
    summary["bytes"] = sum(p.stat().st_size for p in output.rglob("*.tar"))
    (output / "manifest.json").write_text(json.dumps(summary, indent=1))
    return summary
