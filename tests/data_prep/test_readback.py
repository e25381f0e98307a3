"""Shards written by data_prep, read back by the stage DataModules and the benchmark reader: every sample
arrives, with its answers' text and its frame count (images replicated to 8, videos at 1 FPS)."""

from __future__ import annotations

import pytest
from prepkit import read_shards
from sourcekit import FIXTURES

from data_prep.cli import convert
from data_prep.synthetic import SyntheticConfig, generate
from fovlm.data.datamodules import CaptionDataModule, PreferenceDataModule, SFTDataModule
from fovlm.data.roles import ROLE_ANSWER
from fovlm.eval.benchmarks import BenchmarkReader

SIZE = 32
IMAGE_FRAMES = 8
TRAINING = ["openvid", "webvid", "vript", "sharegpt4video", "vista", "llava_video", "cauldron", "smoltalk"]


def _expected(folder) -> dict[str, tuple[int, str]]:
    """key -> (frames the loader must give, the answers' text as the chat renders them)."""
    out = {}
    for s in read_shards(folder):
        sample = s["sample"]
        frames = 0 if s["frames"] is None else (IMAGE_FRAMES if sample.media == "image" else s["frames"].shape[0])
        if sample.caption is not None:
            answers = [sample.caption]
        elif sample.chosen is not None:
            answers = [sample.chosen]
        else:
            answers = [m.content for m in sample.messages if m.role == "assistant"]
        out[s["key"]] = (frames, "".join(a + "<|im_end|>" for a in answers))
    return out


def _read(cls, folder, tokenizer_dir, tokenizer, tmp_path, prefix="") -> dict[str, tuple[int, str]]:
    dm = cls(train_shards=str(folder / "*.tar"), tokenizer=str(tokenizer_dir), frame_size=SIZE, batch_size=3,
             num_workers=0, text_ratio=0.0, shuffle_buffer=4, index_cache=str(tmp_path / "index"), max_length=512,
             image_frames=IMAGE_FRAMES)
    dm.setup("fit")
    got = {}
    for batch in dm.train_dataloader():
        assert batch["frames"].shape[0] == int(batch["num_frames"].sum())
        assert tuple(batch["frames"].shape[1:]) == (3, SIZE, SIZE)
        ids, roles = batch[f"{prefix}input_ids"], batch[f"{prefix}roles"]
        for i, key in enumerate(batch["key"]):
            got[key.rsplit("/", 1)[-1]] = (int(batch["num_frames"][i]), tokenizer.decode(ids[i][roles[i] == ROLE_ANSWER]))
    assert not {k: v for k, v in dm.skip_counts().items() if k not in ("truncated", "padded")}
    return got


@pytest.mark.parametrize("source", TRAINING + ["rlaif_v"])
def test_datamodules_read_every_source(source, tmp_path, smollm2_dir, tokenizer):
    input_path, media, expected_texts, _ = FIXTURES[source](tmp_path / "raw")
    convert(source, input_path, tmp_path / "shards", media, workers=0, progress=False)
    expected = _expected(tmp_path / "shards")
    assert len(expected) == len(expected_texts)
    if source == "rlaif_v":
        got = _read(PreferenceDataModule, tmp_path / "shards", smollm2_dir, tokenizer, tmp_path, prefix="chosen_")
    else:
        got = _read(SFTDataModule, tmp_path / "shards", smollm2_dir, tokenizer, tmp_path)
    assert got == expected


@pytest.mark.parametrize("source", ["mvbench", "videomme", "mlvu"])
def test_benchmark_reader_reads_every_question(source, tmp_path):
    input_path, media, expected_texts, _ = FIXTURES[source](tmp_path / "raw")
    convert(source, input_path, tmp_path / "shards", media, workers=0, progress=False)
    questions = list(BenchmarkReader(source, str(tmp_path / "shards"), frame_size=SIZE))
    got = {f"{q.question}|{'/'.join(q.options)}|{q.answer}|{q.category}": q.frames.shape[0] for q in questions}
    assert got == expected_texts


def test_synthetic_sets_feed_every_stage(tmp_path, smollm2_dir, tokenizer):
    config = SyntheticConfig(seed=5, caption_train=4, caption_val=0, sft_train=5, sft_val=0, text_train=3,
                             text_val=0, preference_train=4, preference_val=0, mcq=4, look_warmup=2, look_train=3,
                             look_val=0, look_test=4, look_preference=2)
    generate(tmp_path, config, workers=0, progress=False)
    for cls, name, prefix in [(CaptionDataModule, "caption/train", ""), (SFTDataModule, "sft/train", ""),
                              (SFTDataModule, "text/train", ""), (PreferenceDataModule, "preference/train", "chosen_"),
                              (SFTDataModule, "look_warmup/train", ""), (SFTDataModule, "look_sft/train", ""),
                              (PreferenceDataModule, "look_preference/train", "chosen_")]:
        assert _read(cls, tmp_path / name, smollm2_dir, tokenizer, tmp_path, prefix) == _expected(tmp_path / name)
    questions = list(BenchmarkReader("synthetic", str(tmp_path / "mcq" / "test"), frame_size=SIZE))
    assert len(questions) == 4 and all(4 <= q.frames.shape[0] <= 8 for q in questions)
    looks = list(BenchmarkReader("synthetic", str(tmp_path / "look_mcq" / "test"), frame_size=SIZE))
    assert {q.category for q in looks} == {"look_colour", "look_shape"} and all(q.frames.shape[0] == 2 for q in looks)
