"""The shared multiple-choice scorer on tiny random FoveatedVLMs: exactness, patch-pass count, learning."""

import math

import pytest
import torch
from eval_helpers import make_tiny_vlm, write_mcq_shard

from fovlm.data.frames import normalize
from fovlm.data.roles import ROLE_ANSWER
from fovlm.eval.benchmarks import BenchmarkReader
from fovlm.eval.questions import render_options
from fovlm.eval.run import evaluate
from fovlm.eval.scoring import score_question, score_question_naive
from fovlm.losses import AnswerOnlyCE
from fovlm.model.vlm import MODES

QUESTION = "What colour is the ball?"
OPTIONS = ("red", "a bright green ball", "blue", "it is yellow")


class PatchPassCounter:
    """Counts DINO patch passes (calls of the embeddings) and the frames they encode."""

    def __init__(self, model):
        self.calls, self.frames = 0, 0
        self.handle = model.encoder.dino.embeddings.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1
        self.frames += inputs[0].shape[0]


def test_shared_scores_equal_the_reference_way_and_a_hand_computation(tiny_vlm, tokenizer):
    frames = torch.randn(3, 3, 224, 224)
    options = render_options(tokenizer, QUESTION, OPTIONS)
    shared = score_question(tiny_vlm, frames, options)
    naive = score_question_naive(tiny_vlm, frames, options)
    assert list(shared) == list(MODES)
    for mode in MODES:
        assert shared[mode].shape == (4,)
        torch.testing.assert_close(shared[mode], naive[mode], atol=1e-5, rtol=1e-5)
    # By hand for option 1 in coarse_fine: full-sequence logits, log-softmax, mean over the answer tokens.
    ids = options.full_ids[1][options.full_roles[1] != 0]
    roles = options.full_roles[1][: len(ids)]
    with torch.no_grad():
        logits = tiny_vlm(frames, torch.tensor([3]), ids[None], torch.ones(1, len(ids), dtype=torch.long),
                          mode="coarse_fine").logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    answer = (roles == ROLE_ANSWER).nonzero().flatten().tolist()
    assert tokenizer.decode(ids[answer]) == "B. a bright green ball<|im_end|>"
    hand = -sum(float(logp[j - 1, ids[j]]) for j in answer) / len(answer)
    assert math.isclose(float(shared["coarse_fine"][1]), hand, rel_tol=1e-5)


@pytest.mark.parametrize("num_options", [2, 5])
def test_one_patch_pass_per_question_whatever_the_options_and_modes(tiny_vlm, tokenizer, num_options):
    frames = torch.randn(4, 3, 224, 224)
    options = render_options(tokenizer, QUESTION, [f"option {i}" for i in range(num_options)])
    counter = PatchPassCounter(tiny_vlm)
    score_question(tiny_vlm, frames, options, MODES)
    assert (counter.calls, counter.frames) == (1, 4)
    counter.calls = counter.frames = 0
    score_question_naive(tiny_vlm, frames, options, MODES)  # the fVLM original's way: per option and mode
    assert (counter.calls, counter.frames) == (len(MODES), len(MODES) * num_options * 4)


def test_benchmark_reader_replicates_images_and_skips_bad_samples(tmp_path, tokenizer):
    shard = write_mcq_shard(tmp_path / "000000.tar")
    reader = BenchmarkReader("toy", str(tmp_path))
    questions = list(reader)
    assert [q.key for q in questions] == ["img0", "vid0"]
    assert questions[0].frames.shape == (8, 3, 224, 224) and questions[0].media == "image"
    assert bool((questions[0].frames == questions[0].frames[:1]).all())
    assert questions[1].frames.shape[0] == 3 and questions[1].times == (0.5, 1.5, 2.5)
    assert reader.skipped == {"bad_image": 1}

    model = make_tiny_vlm()
    counter = PatchPassCounter(model)
    report = evaluate(model, tokenizer, {"toy": BenchmarkReader("toy", shard)})
    assert (counter.calls, counter.frames) == (2, 8 + 3)  # one pass per question; the image as 8 frames
    results = report.compute()["toy"]
    assert set(results) == set(MODES) and all(results[m]["total"] == 2 for m in MODES)


def test_a_model_trained_towards_an_option_picks_it(tokenizer):
    model = make_tiny_vlm(seed=1)
    frames = normalize(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8))
    options = render_options(tokenizer, QUESTION, OPTIONS)
    before = score_question(model, frames, options)
    target = int(before["coarse_fine"].argmax())  # the option the untrained model likes least
    length = int((options.full_roles[target] != 0).sum())
    batch = {
        "frames": frames, "num_frames": torch.tensor([2]),
        "input_ids": options.full_ids[target : target + 1, :length],
        "attention_mask": torch.ones(1, length, dtype=torch.long),
        "roles": options.full_roles[target : target + 1, :length],
    }
    head = AnswerOnlyCE()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(12):
        loss = head(model, batch, mode=MODES[step % 3]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = score_question(model.eval(), frames, options)
    for mode in MODES:
        assert int(after[mode].argmin()) == target, (mode, before[mode], after[mode])
