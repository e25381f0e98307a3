"""``fovlm eval`` on long videos: the reader leaves them undecoded, evaluate streams them with the batched path's
results, and a stream that fails part-way is a counted skip."""

import json

import pytest
import torch
import webdataset as wds
from eval_helpers import PatchPasses, make_tiny_vlm, mp4_bytes, png_bytes

from fovlm.data.frame_stream import SampleFrames
from fovlm.data.frames import FrameDecodeError
from fovlm.eval import benchmarks
from fovlm.eval.benchmarks import BenchmarkReader
from fovlm.eval.run import evaluate, parse_args
from fovlm.model.vlm import MODES

SETTINGS = dict(max_frames=100, frame_size=42)  # 3 x 3 patches


def write_long_video_shard(path) -> str:
    """An 80 s video question (80 frames at 1 FPS) with an answer region, a 3-frame video and an image."""
    region = {"box": [0.5, 0.0, 1.0, 0.5], "from": 20}
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "long0", "mp4": mp4_bytes(80, fps=1, size=(32, 24)), "json": json.dumps({
            "source": "toy", "media": "video", "question": "What happens?", "options": ["it fades", "nothing"],
            "answer": 0, "category": "long", "duration": 80.0, "answer_region": region}).encode()})
        short = {"__key__": "short0", "json": json.dumps({
            "source": "toy", "media": "video", "question": "Which way?", "options": ["left", "right", "up"],
            "answer": 2, "category": "motion", "answer_region": region | {"from": 0}}).encode()}
        for t in range(3):
            short[f"{t:03d}.png"] = png_bytes((0, 80 * t, 0))
        sink.write(short)
        sink.write({"__key__": "img0", "png": png_bytes((255, 0, 0)), "json": json.dumps({
            "source": "toy", "media": "image", "question": "What colour is it?", "options": ["red", "blue"],
            "answer": 0, "category": "colour"}).encode()})
    return str(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_long_video_shard(tmp_path_factory.mktemp("long") / "long.tar")


def test_the_reader_leaves_a_long_video_undecoded(shard):
    streamed = list(BenchmarkReader("toy", shard, stream_above=64, **SETTINGS))
    stacked = list(BenchmarkReader("toy", shard, **SETTINGS))
    long, short = streamed[0], streamed[1]
    assert long.streamed and isinstance(long.frames, SampleFrames) and not isinstance(long.frames, torch.Tensor)
    assert len(long.frames) == 80 and long.times == stacked[0].times == tuple(t + 0.5 for t in range(80))
    assert torch.equal(torch.stack(list(long.frames)), stacked[0].frames)  # the frames the batched path reads
    assert not short.streamed and torch.equal(short.frames, stacked[1].frames)
    assert not any(q.streamed for q in stacked)


def test_evaluate_streams_long_videos_with_the_batched_results(shard, tokenizer):
    model = make_tiny_vlm()
    passes = PatchPasses(model)
    on = evaluate(model, tokenizer, {"toy": BenchmarkReader("toy", shard, stream_above=64, **SETTINGS)})
    assert (passes.calls, passes.frames) == (80 + 2, 80 + 3 + 8)  # the long video: one frame per patch pass
    off = evaluate(model, tokenizer, {"toy": BenchmarkReader("toy", shard, stream_above=None, **SETTINGS)})
    assert passes.calls == 82 + 3
    on, off = on.compute()["toy"], off.compute()["toy"]
    for mode in MODES:
        assert on[mode]["total"] == off[mode]["total"] == 3
        for category in ("long", "motion", "colour"):
            assert on[mode]["per_category"][category]["correct"] == off[mode]["per_category"][category]["correct"]
        assert on[mode]["per_category"]["long"]["attention_share"] == pytest.approx(
            off[mode]["per_category"]["long"]["attention_share"], abs=1e-5)


def test_a_stream_that_fails_part_way_is_a_counted_skip(shard, tokenizer, monkeypatch):
    real = benchmarks.sample_video_frames

    def failing(members, size, max_frames):
        frames = real(members, size, max_frames)

        def first_two():
            yield from list(frames)[:2]
            raise FrameDecodeError("cannot decode video (truncated)", "bad_video")

        return SampleFrames(len(frames), first_two)

    monkeypatch.setattr(benchmarks, "sample_video_frames", failing)
    reader = BenchmarkReader("toy", shard, stream_above=64, **SETTINGS)
    results = evaluate(make_tiny_vlm(), tokenizer, {"toy": reader}).compute()["toy"]
    assert reader.skipped == {"bad_video": 1} and reader.record.examples == [("long.tar/long0", "bad_video")]
    assert all(results[mode]["total"] == 2 and "long" not in results[mode]["per_category"] for mode in MODES)


def test_stream_above_option():
    args = ["--model", "m", "--benchmark", "toy=shards"]
    assert parse_args(args).stream_above == 64
    assert parse_args([*args, "--stream-above", "0"]).stream_above == 0
    with pytest.raises(SystemExit):
        parse_args([*args, "--stream-above", "-1"])
