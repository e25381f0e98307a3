"""The stage DataModules end to end: batch contract, image replication, bad input, the fVLM original's layouts,
frame budgets, and a resumed Lightning run that continues with the next batch."""

import lightning as L
import pytest
import torch
from shardkit import caption_sample, image_bytes, mp4_bytes, text_sample, write_shard

from fovlm.data.datamodules import CaptionDataModule, PreferenceDataModule, SFTDataModule
from fovlm.data.readable import NoReadableSampleError
from fovlm.data.roles import ROLE_ANSWER, ROLE_PAD

SIZE = 16
SFT_KEYS = {"frames", "num_frames", "input_ids", "attention_mask", "roles", "source", "key"}
PREF_KEYS = {"frames", "num_frames", "source", "key"} | {
    f"{side}_{name}" for side in ("chosen", "rejected") for name in ("input_ids", "attention_mask", "roles")
}


def _module(cls, tok_dir, tmp_path, **kwargs):
    defaults = dict(
        tokenizer=str(tok_dir),
        frame_size=SIZE,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        index_cache=str(tmp_path / "index"),
        max_length=256,
    )
    defaults.update(kwargs)
    dm = cls(**defaults)
    dm.setup("fit")
    return dm


def _mixed_shards(root):
    image = {
        "__key__": "img_0",
        "json": {
            "source": "cauldron",
            "media": "image",
            "messages": [
                {"role": "user", "content": "What colour?"},
                {"role": "assistant", "content": "Red."},
            ],
        },
        "jpg": image_bytes((220, 20, 20), (40, 24)),
    }
    one_frame_video = caption_sample("vid_one", "A single frame.", frames=1)
    mp4 = {
        "__key__": "vid_mp4",
        "json": {"source": "vript", "media": "video", "caption": "Getting redder.", "duration": 3.0},
        "mp4": mp4_bytes(12, fps=4),
    }
    multi_turn = {
        "__key__": "vid_chat",
        "json": {
            "source": "llava",
            "media": "video",
            "messages": [
                {"role": "user", "content": "What moves?"},
                {"role": "assistant", "content": "A ball."},
                {"role": "user", "content": "Where to?"},
                {"role": "assistant", "content": "To the left."},
            ],
        },
        **{f"{i:03d}.jpg": image_bytes(pattern=i + 1) for i in range(5)},
    }
    video = write_shard(
        root / "video-000.tar",
        [image, one_frame_video, mp4, multi_turn, caption_sample("vid_3", "Three frames.", frames=3)],
    )
    text = write_shard(root / "text-000.tar", [text_sample(f"txt_{i}", f"Answer {i}.") for i in range(3)])
    return str(video), str(text)


def test_sft_batches_follow_the_contract(smollm2_dir, tokenizer, tmp_path):
    video, text = _mixed_shards(tmp_path)
    dm = _module(
        SFTDataModule,
        smollm2_dir,
        tmp_path,
        train_shards=video,
        text_shards=text,
        text_ratio=0.3,
        shuffle_buffer=1,
    )
    batches = list(dm.train_dataloader())
    samples = {}
    for batch in batches:
        assert set(batch) == SFT_KEYS
        B, S = batch["input_ids"].shape
        assert batch["frames"].dtype == torch.float32 and batch["frames"].shape[1:] == (3, SIZE, SIZE)
        assert batch["frames"].shape[0] == batch["num_frames"].sum()  # no padded frame anywhere
        assert batch["num_frames"].dtype == torch.long and batch["num_frames"].shape == (B,)
        for t in ("input_ids", "attention_mask", "roles"):
            assert batch[t].dtype == torch.long and batch[t].shape == (B, S)
        lengths = batch["attention_mask"].sum(1)
        assert int(lengths.max()) == S
        for i in range(B):
            n = int(lengths[i])
            assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
            assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
            assert (batch["roles"][i, n:] == ROLE_PAD).all() and (batch["roles"][i, :n] != ROLE_PAD).all()
        starts = torch.cat([torch.zeros(1, dtype=torch.long), batch["num_frames"].cumsum(0)])
        for i, key in enumerate(batch["key"]):
            samples[key] = (
                batch["frames"][starts[i] : starts[i + 1]],
                batch["input_ids"][i, : int(lengths[i])],
                batch["roles"][i, : int(lengths[i])],
                batch["source"][i],
            )
    assert set(samples) == {"img_0", "vid_one", "vid_mp4", "vid_chat", "vid_3", "txt_0", "txt_1"}
    frames = {k: v[0].shape[0] for k, v in samples.items()}
    # An image becomes 8 identical frames; a one-frame video stays one frame; mp4 at 1 FPS over 3 s.
    assert frames == {
        "img_0": 8,
        "vid_one": 1,
        "vid_mp4": 3,
        "vid_chat": 5,
        "vid_3": 3,
        "txt_0": 0,
        "txt_1": 0,
    }
    img = samples["img_0"][0]
    assert all(torch.equal(img[0], img[i]) for i in range(8))
    # ImageNet normalisation of the red image: the red channel well above zero, green/blue below.
    assert img[0, 0].mean() > 1.5 and img[0, 1].mean() < -1.0
    ids, roles = samples["vid_chat"][1], samples["vid_chat"][2]
    answers = tokenizer.decode(ids[roles == ROLE_ANSWER])
    assert answers == "A ball.<|im_end|>To the left.<|im_end|>"
    assert "Provide a detailed narration" in tokenizer.decode(samples["vid_mp4"][1])  # the vript prompt
    assert samples["txt_0"][3] == "smoltalk"
    assert dm.skip_counts() == {}


def test_preference_batches(smollm2_dir, tokenizer, tmp_path):
    pairs = [
        {
            "__key__": f"pair_{i}",
            "json": {
                "source": "rlaif_v",
                "media": "image",
                "messages": [{"role": "user", "content": f"Describe {i}."}],
                "chosen": "A red square.",
                "rejected": "A blue circle, large.",
            },
            "jpg": image_bytes(pattern=i + 1),
        }
        for i in range(3)
    ]
    # The fVLM original's DPO layout (user / chosen_assistant / rejected_assistant) loads as well.
    pairs.append(
        {
            "__key__": "legacy_pair",
            "json": {
                "user": "",
                "chosen_assistant": "Good.",
                "rejected_assistant": "Bad.",
                "source": "rlaif_v",
                "frame_count": 1,
            },
            "jpg": image_bytes(),
        }
    )
    shard = write_shard(tmp_path / "pairs-000.tar", pairs)
    dm = _module(PreferenceDataModule, smollm2_dir, tmp_path, train_shards=str(shard), batch_size=2)
    batches = list(dm.train_dataloader())
    assert [set(b) for b in batches] == [PREF_KEYS, PREF_KEYS]
    for b in batches:
        assert b["num_frames"].tolist() == [8, 8] and b["frames"].shape[0] == 16
        for side in ("chosen", "rejected"):
            ids, roles = b[f"{side}_input_ids"], b[f"{side}_roles"]
            assert ids.shape == roles.shape == b[f"{side}_attention_mask"].shape
    by_key = {k: (b, i) for b in batches for i, k in enumerate(b["key"])}
    b, i = by_key["legacy_pair"]
    chosen = b["chosen_input_ids"][i][b["chosen_roles"][i] == ROLE_ANSWER]
    assert tokenizer.decode(chosen) == "Good.<|im_end|>"
    assert "Describe this." in tokenizer.decode(b["chosen_input_ids"][i])  # per-source prompt for empty user
    b, i = by_key["pair_1"]
    rejected = b["rejected_input_ids"][i][b["rejected_roles"][i] == ROLE_ANSWER]
    assert tokenizer.decode(rejected) == "A blue circle, large.<|im_end|>"


def test_reference_layouts_load(smollm2_dir, tokenizer, tmp_path):
    from fovlm.data.chat import render_chat

    ids, roles = render_chat(
        tokenizer, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}]
    )
    samples = [
        {
            "__key__": "pretok",
            "json": {"token_ids": ids, "loss_mask": [1] * len(ids), "source": "webvid", "frame_count": 2},
            "000.jpg": image_bytes(),
            "001.jpg": image_bytes(),
        },
        {
            "__key__": "rawua",
            "json": {"user": "What is shown?", "assistant": "A dog.", "source": "vista", "frame_count": 2},
            "000.jpg": image_bytes(),
            "001.jpg": image_bytes(),
        },
        {
            "__key__": "rawcap",
            "json": {"source": "openvid", "frame_count": 1},
            "txt": b"A cat sleeps.",
            "000.jpg": image_bytes(),
        },
        {
            "__key__": "pretok_text",
            "json": {
                "token_ids": ids,
                "loss_mask": [0] * 10 + [1] * (len(ids) - 10),
                "source": "smoltalk",
                "is_text_only": True,
            },
        },
    ]
    shard = write_shard(tmp_path / "legacy-000.tar", samples)
    dm = _module(
        CaptionDataModule, smollm2_dir, tmp_path, train_shards=str(shard), batch_size=4, text_ratio=0.0
    )
    (batch,) = list(dm.train_dataloader())
    by_key = {k: i for i, k in enumerate(batch["key"])}
    n = batch["attention_mask"].sum(1)
    i = by_key["pretok"]
    assert batch["input_ids"][i, : n[i]].tolist() == ids and batch["roles"][i, : n[i]].tolist() == roles
    i = by_key["rawua"]
    assert (
        tokenizer.decode(batch["input_ids"][i, : n[i]][batch["roles"][i, : n[i]] == ROLE_ANSWER])
        == "A dog.<|im_end|>"
    )
    i = by_key["rawcap"]
    text = tokenizer.decode(batch["input_ids"][i, : n[i]])
    assert "Write a brief caption for this video." in text and "A cat sleeps.<|im_end|>" in text
    # The fVLM original replicated any one-frame sample; its layouts carry no media field: one frame is an image.
    frames = dict(zip(batch["key"], batch["num_frames"].tolist(), strict=True))
    assert frames == {"pretok": 2, "rawua": 2, "rawcap": 8, "pretok_text": 0}


def _bad_shards(root):
    good = [caption_sample(f"good_{i}", f"Fine clip {i}.", frames=2) for i in range(9)]
    corrupt_jpeg = caption_sample("bad_jpeg", "Broken frame.", frames=2)
    corrupt_jpeg["001.jpg"] = corrupt_jpeg["001.jpg"][:40]
    no_text = {
        "__key__": "no_text",
        "json": {"source": "openvid", "media": "video"},
        "000.jpg": image_bytes(),
    }
    non_utf8 = {
        "__key__": "non_utf8",
        "json": b'{"source": "openvid", "media": "video", "caption": "caf\xe9"}',
        "000.jpg": image_bytes(),
    }
    fake_mp4 = {
        "__key__": "fake_mp4",
        "json": {"source": "vript", "media": "video", "caption": "No video."},
        "mp4": b"\x00\x00\x00\x18ftypisom" + b"garbage" * 50,
    }
    no_json = {"__key__": "no_json", "000.jpg": image_bytes()}
    # Bad samples between good ones, so every worker has more good samples than batches.
    bad = [corrupt_jpeg, no_text, non_utf8, fake_mp4, no_json]
    write_shard(
        root / "bad-000.tar", [s for pair in zip(good[:5], bad, strict=True) for s in pair] + [good[5]]
    )
    empty = caption_sample("empty_text", "   ", frames=1)
    long_prompt = {
        "__key__": "cut_away",
        "json": {
            "source": "x",
            "media": "video",
            "messages": [
                {"role": "user", "content": "Describe it. " * 100},  # > max_length: no answer token left
                {"role": "assistant", "content": "Fine."},
            ],
        },
        "000.jpg": image_bytes(),
    }
    long_answer = caption_sample("long_answer", "A very long caption. " * 80, frames=1)  # cut, still trained
    extra = [empty, long_prompt, long_answer]
    full = write_shard(
        root / "bad-001.tar",
        good[6:] + extra + [caption_sample(f"lost_{i}", "x", frames=2) for i in range(3)],
    )
    data = full.read_bytes()
    # Cut the tar inside the data of sample lost_1: the samples before it remain readable.
    cut = data.find(b"lost_1.json")
    full.write_bytes(data[: cut + 700])
    return str(root / "bad-{000..001}.tar")


def test_bad_input_is_skipped_and_counted(smollm2_dir, tmp_path, caplog):
    pattern = _bad_shards(tmp_path)
    dm = _module(SFTDataModule, smollm2_dir, tmp_path, train_shards=pattern, batch_size=3, num_workers=2)
    with caplog.at_level("WARNING"):
        keys = [k for b in dm.train_dataloader() for k in b["key"]]
    # Each good sample once, nothing repeated; the long answer is truncated but trains.
    assert sorted(keys) == [f"good_{i}" for i in range(9)] + ["long_answer", "lost_0"]
    assert dm.skip_counts() == {
        "bad_image": 1,
        "missing_text": 1,
        "invalid_json": 1,
        "bad_video": 1,
        "missing_json": 1,
        "empty_text": 1,
        "truncated_away": 1,
        "truncated": 1,
        "damaged_shard": 1,
    }
    # One warning per reason, naming an example.
    messages = [r.getMessage() for r in caplog.records]
    skip_reasons = ("bad_image", "missing_text", "invalid_json", "bad_video", "missing_json", "empty_text")
    for reason in skip_reasons + ("truncated_away",):
        assert sum(f"({reason})" in m for m in messages) == 1
    assert any("truncated" in m and "bad-001.tar" in m for m in messages)


def unreadable_shards(root):
    """``bad-000.tar``: three samples with an undecodable frame and one without text; ``cut-000.tar``: a tar cut
    inside its first sample."""
    broken = [caption_sample(f"broken_{i}", "A clip.", frames=2) for i in range(3)]
    for sample in broken:
        sample["001.jpg"] = b"not a jpeg"
    no_text = {"__key__": "no_text", "json": {"source": "openvid", "media": "video"}, "000.jpg": image_bytes()}
    write_shard(root / "bad-000.tar", [*broken, no_text])
    cut = write_shard(root / "cut-000.tar", [caption_sample("lost", "Cut off.", frames=2)])
    cut.write_bytes(cut.read_bytes()[:700])
    return str(root / "bad-*.tar"), str(cut)


def test_a_split_without_a_readable_sample_is_named_with_its_skips(smollm2_dir, tmp_path):
    bad, cut = unreadable_shards(tmp_path / "shards")
    good = str(write_shard(tmp_path / "good" / "000.tar", [caption_sample("fine", "A fine clip.")]))
    with pytest.raises(NoReadableSampleError) as error:
        _module(SFTDataModule, smollm2_dir, tmp_path, train_shards=[bad, cut], text_ratio=0.0)
    assert (error.value.split, error.value.argument) == ("train", "train_shards")
    assert dict(error.value.record.counts) == {"bad_image": 3, "missing_text": 1, "damaged_shard": 1}
    message = str(error.value)
    assert "\n" not in message
    assert f"no readable sample in the train shards ({bad!r}, {cut!r}: 2 files)" in message
    assert "bad_image: 3, damaged_shard: 1, missing_text: 1; first: bad-000.tar/broken_0 (bad_image)" in message
    # The validation split, and a weighted training group, are checked the same way.
    with pytest.raises(NoReadableSampleError, match=r"val shards .*cut-000.tar \(damaged_shard\)"):
        _module(SFTDataModule, smollm2_dir, tmp_path, train_shards=good, val_shards=cut, text_ratio=0.0)
    with pytest.raises(NoReadableSampleError, match="train group 'b' .*bad_image: 3"):
        _module(SFTDataModule, smollm2_dir, tmp_path, train_shards={"a": good, "b": bad},
                group_weights={"a": 1.0, "b": 1.0}, text_ratio=0.0)
    # One readable sample is enough: the bad ones are skipped while training, as before.
    dm = _module(SFTDataModule, smollm2_dir, tmp_path, train_shards=[bad, good], text_ratio=0.0, batch_size=8)
    assert [k for b in dm.train_dataloader() for k in b["key"]] == ["fine"]
    assert dm.skip_counts() == {"bad_image": 3, "missing_text": 1}


def test_frame_budget(smollm2_dir, tmp_path):
    samples = [caption_sample(f"v{i}", "c", frames=1 + i % 4) for i in range(20)]
    shard = write_shard(tmp_path / "v-000.tar", samples)
    dm = _module(
        SFTDataModule,
        smollm2_dir,
        tmp_path,
        train_shards=str(shard),
        batch_size=8,
        max_frames_per_batch=6,
        text_ratio=0.0,
    )
    batches = list(dm.train_dataloader())
    assert all(int(b["num_frames"].sum()) <= 6 for b in batches)
    assert sorted(k for b in batches for k in b["key"]) == sorted(f"v{i}" for i in range(20))
    assert max(len(b["key"]) for b in batches) > 1


def test_init_does_no_io(tmp_path):
    # Nothing exists at these paths: construction must not touch them (setup does).
    dm = SFTDataModule(train_shards=str(tmp_path / "missing-*.tar"), tokenizer=str(tmp_path / "no-tokenizer"))
    assert dm.tokenizer is None and dm.batch_size == 8 and dm.image_frames == 8 and dm.text_ratio == 0.14
    assert CaptionDataModule(train_shards="x", tokenizer="y").max_length == 512
    assert PreferenceDataModule(train_shards="x", tokenizer="y").text_ratio == 0.0
    with pytest.raises(FileNotFoundError, match="missing-"):
        SFTDataModule(train_shards=str(tmp_path / "missing-*.tar"), tokenizer="unused").setup("fit")


class _KeyRecorder(L.LightningModule):
    """A minimal module that trains on the batch text and records the keys it saw."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(49152, 4)
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["key"]))
        assert (
            batch["frames"].dtype == torch.float32
        )  # normalised after the transfer (on_after_batch_transfer)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (self.embed(batch["input_ids"]) * mask).pow(2).mean() + batch["frames"].mean() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_resume_continues_the_stream(smollm2_dir, tmp_path):
    shard = write_shard(
        tmp_path / "v-000.tar", [caption_sample(f"v{i:02d}", f"clip {i}", frames=1) for i in range(24)]
    )

    def run(max_steps, ckpt_path=None, save_every=None):
        dm = SFTDataModule(
            train_shards=str(shard),
            tokenizer=str(smollm2_dir),
            frame_size=SIZE,
            batch_size=2,
            num_workers=2,
            shuffle_buffer=6,
            text_ratio=0.0,
            index_cache=str(tmp_path / "index"),
        )
        module = _KeyRecorder()
        callbacks = (
            [
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1
                )
            ]
            if save_every
            else []
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=bool(save_every),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module.seen

    full = run(16)  # 12 batches per epoch: crosses into epoch 1
    assert sorted(k for b in full[:12] for k in b) == [f"v{i:02d}" for i in range(24)]
    assert full[12:] != full[:4]  # epoch 1 is reshuffled
    first = run(7, save_every=5)  # a checkpoint in the middle of epoch 0, after step 5
    assert first == full[:7]
    ckpt = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning stored the loader position
    rest = run(16, ckpt_path=str(ckpt))
    assert rest == full[5:]  # the resumed run continues with batch 6, into epoch 1
