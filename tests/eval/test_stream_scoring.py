"""The streamed multiple-choice scorer on tiny random FoveatedVLMs: the batched scorer's scores and attention
shares from one pass over frames that arrive one at a time, one patch pass per frame, and its position limit."""

import pytest
import torch
from eval_helpers import PatchPasses
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.data.schema import AnswerRegion
from fovlm.eval.looking import attention_shares, region_share
from fovlm.eval.questions import render_options
from fovlm.eval.scoring import question_length, score_question
from fovlm.eval.stream_scoring import StreamTooLong, score_stream
from fovlm.model.loading import tiny_llm_config, tiny_vision_config
from fovlm.model.vlm import MODES, FoveatedVLM

QUESTION = "Where is the red ball?"
OPTIONS = ("left", "in the top right corner", "nowhere")
BOX = (0.5, 0.0, 1.0, 0.5)


def tiny(k: int = 1, question_first: bool = False, max_positions: int = 2048) -> FoveatedVLM:
    """A tiny random model holding 2 queries per frame, reading ``k`` of them."""
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llm_config(max_position_embeddings=max_positions))
    model = FoveatedVLM(Dinov2Model(tiny_vision_config()), llm, query_dim=32, num_queries=2,
                        question_first=question_first).eval()
    model.use_queries(k)
    return model


@pytest.mark.parametrize("spread", [False, True], ids=["box", "spread"])
@pytest.mark.parametrize("question_first", [False, True], ids=["visual-first", "question-first"])
@pytest.mark.parametrize("k", [1, 2])
def test_streamed_scores_and_shares_equal_the_batched_ones(tokenizer, k, question_first, spread):
    model = tiny(k, question_first)
    frames = torch.randn(4, 3, 56, 56)
    options = render_options(tokenizer, QUESTION, OPTIONS)
    batched = score_question(model, frames, options)
    passes = PatchPasses(model)
    region = AnswerRegion(None, 1.0, (BOX, (0.0, 0.5, 0.5, 1.0))) if spread else AnswerRegion(BOX, 1.0)
    streamed = score_stream(model, iter(frames), options, region=region, num_frames=4)
    assert (passes.calls, passes.frames) == (4, 4)  # one patch pass per frame, shared by every mode
    assert streamed.num_frames == 4 and list(streamed.scores) == list(MODES)
    for mode in MODES:
        torch.testing.assert_close(streamed.scores[mode], batched[mode], atol=1e-4, rtol=1e-4)
    question_len = question_length(model, options)
    head = options.prefix_ids[:question_len] if question_len else None
    times = (0.5, 1.5, 2.5, 3.5)
    expected = attention_shares(model, frames, region, times, MODES, head_ids=head)
    for mode in MODES:
        assert streamed.shares[mode].shape == (4,)
        assert region_share(streamed.shares[mode], times, region.start) == pytest.approx(expected[mode], abs=1e-5)


def test_some_modes_only(tokenizer):
    model = tiny()
    frames = torch.randn(3, 3, 56, 56)
    options = render_options(tokenizer, QUESTION, OPTIONS)
    batched = score_question(model, frames, options)
    streamed = score_stream(model, iter(frames), options, modes=("coarse_fine",))
    assert list(streamed.scores) == ["coarse_fine"] and streamed.shares == {}
    torch.testing.assert_close(streamed.scores["coarse_fine"], batched["coarse_fine"], atol=1e-4, rtol=1e-4)


def test_a_video_over_the_position_limit_is_a_clear_error(tokenizer):
    options = render_options(tokenizer, QUESTION, OPTIONS)
    prompt = options.prefix_ids.shape[0] + options.option_ids.shape[1]  # 50
    model = tiny(max_positions=prompt + 2)
    passes = PatchPasses(model)
    with pytest.raises(StreamTooLong, match="lower --max-frames"):
        score_stream(model, iter(torch.randn(3, 3, 56, 56)), options, num_frames=3)
    assert passes.calls == 0  # told before the first frame
    with pytest.raises(StreamTooLong, match=r"need \d+ positions, over the LLM.s \d+"):  # the options do not fit
        score_stream(model, iter(torch.randn(3, 3, 56, 56)), options)
    with pytest.raises(StreamTooLong, match="positions are full after 2 frames"):  # more frames than positions
        score_stream(tiny(max_positions=2), iter(torch.randn(3, 3, 56, 56)), options)
