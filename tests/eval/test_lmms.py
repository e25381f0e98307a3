"""lmms-eval's ``fovlm`` model (fovlm/eval/lmms.py): registered with the harness, called with lmms-eval's own
request objects on tiny exported models; its scores are fovlm eval's and its answers fovlm predict's."""

import numpy as np
import pytest
import torch
from eval_helpers import export_taught_model, make_tiny_vlm, mp4_bytes, png_bytes
from lmms_eval.api.instance import Instance
from PIL import Image

from fovlm.data.frames import normalize
from fovlm.eval.lmms import Fovlm, cut_at_stops, decoding, visual_frames
from fovlm.eval.predict import load_media
from fovlm.eval.predict import main as predict_main
from fovlm.eval.questions import render_options
from fovlm.eval.scoring import score_question, score_question_naive
from fovlm.model.vlm import MODES

TASK, SPLIT = "toy", "test"
COLOURS = [" red", " blue", " green"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms_media")
    (folder / "clip.mp4").write_bytes(mp4_bytes(12, fps=4))  # 3 s -> 3 frames at 1 FPS
    (folder / "photo.png").write_bytes(png_bytes((200, 40, 40)))
    return folder


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tokenizer):
    """A tiny model taught to answer "red" to any question about any clip."""
    return export_taught_model(tmp_path_factory.mktemp("lmms_taught"), tokenizer)


@pytest.fixture(scope="module")
def untaught(tmp_path_factory, tokenizer):
    """A tiny random model: its answers are arbitrary tokens, so equal answers are not a coincidence."""
    from fovlm.export import export_model

    folder = tmp_path_factory.mktemp("lmms_random")
    export_model(make_tiny_vlm(seed=1), tokenizer, folder)
    return folder


def harness_model(folder, media, **model_args) -> Fovlm:
    """The model as lmms-eval builds it (``--model_args``), with the documents lmms-eval hands it."""
    args = ",".join([f"pretrained={folder}"] + [f"{k}={v}" for k, v in model_args.items()])
    lmm = Fovlm.create_from_arg_string(args, {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    lmm.task_dict = {TASK: {SPLIT: [{"video": str(media / "clip.mp4"), "question": "What is shown?"},
                                    {"video": str(media / "photo.png"), "question": "What colour is it?"}]}}
    return lmm


def doc_to_visual(doc):
    return [doc["video"]]


def harness_request(kind: str, doc_id: int, context: str, second) -> Instance:
    """An lmms-eval request as its tasks build them (ConfigurableTask.construct_requests)."""
    return Instance(request_type=kind, arguments=(context, second, doc_to_visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_the_harness_resolves_fovlm_to_this_class(taught, media):
    from lmms_eval.models import AVAILABLE_MODELS, get_model

    assert get_model("fovlm") is Fovlm and AVAILABLE_MODELS["fovlm"] == "Fovlm"
    lmm = harness_model(taught, media, mode="coarse_fine", score="logprob", max_frames=2)
    assert (lmm.mode, lmm.score, lmm.settings.max_frames) == ("coarse_fine", "logprob", 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        harness_model(taught, media, mode="fine")


@pytest.mark.parametrize("mode", MODES)
def test_loglikelihood_is_fovlms_answer_score(untaught, media, tokenizer, mode):
    lmm = harness_model(untaught, media, mode=mode)
    # Interleaved as the harness may hand them: doc 0's three options, and doc 1's one continuation given as
    # a function of the document (a loglikelihood task's doc_to_target).
    requests = [harness_request("loglikelihood", 0, "What is shown?", COLOURS[0]),
                harness_request("loglikelihood", 1, "What colour is it?", lambda doc: " pink"),
                harness_request("loglikelihood", 0, "What is shown?", COLOURS[1]),
                harness_request("loglikelihood", 0, "What is shown?", COLOURS[2])]
    nll = lmm.loglikelihood(requests)
    lmm.score = "logprob"
    logprob = lmm.loglikelihood(requests)
    for doc_id, question, answers, rows in [(0, "What is shown?", COLOURS, [0, 2, 3]),
                                            (1, "What colour is it?", [" pink", " pink"], [1])]:
        frames = normalize(load_media(lmm.task_dict[TASK][SPLIT][doc_id]["video"])[0])
        options = render_options(tokenizer, question, [a.strip() for a in answers], answer_format="cloze")
        shared = score_question(lmm.model, frames, options, (mode,))[mode]  # fovlm eval's mean answer NLL
        summed = -score_question_naive(lmm.model, frames, options, (mode,))[mode] * options.num_targets
        for i, row in enumerate(rows):
            assert nll[row][0] == pytest.approx(float(shared[i]), abs=1e-5)
            assert logprob[row][0] == pytest.approx(float(summed[i]), abs=1e-5)
            assert logprob[row][0] < 0 < nll[row][0]


def test_is_greedy_and_the_harness_choice_follow_the_answer_the_model_writes(taught, media):
    lmm = harness_model(taught, media)
    requests = [harness_request("loglikelihood", 0, "What is shown?", c) for c in [" blue", " red", " green"]]
    results = lmm.loglikelihood(requests)
    assert [greedy for _, greedy in results] == [False, True, False]
    # lmms-eval 0.7.3's multiple_choice picks np.argmin of the values: with score=nll that is "red".
    assert int(np.argmin([value for value, _ in results])) == 1
    lmm.score = "logprob"
    assert int(np.argmax([value for value, _ in lmm.loglikelihood(requests)])) == 1


@pytest.mark.parametrize("model,doc_id", [("taught", 0), ("taught", 1), ("untaught", 0)])
def test_generate_until_is_fovlm_predicts_answer(request, media, capsys, model, doc_id):
    folder = request.getfixturevalue(model)
    lmm = harness_model(folder, media)
    doc = lmm.task_dict[TASK][SPLIT][doc_id]
    gen_kwargs = {"max_new_tokens": 8, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    [text] = lmm.generate_until([harness_request("generate_until", doc_id, doc["question"], gen_kwargs)])
    assert predict_main([doc["video"], "--model", str(folder), "--prompt", doc["question"], "--max-new-tokens", "8",
                         "--device", "cpu"]) == 0
    assert text == capsys.readouterr().out.removesuffix("\n")
    assert text.startswith("red") if model == "taught" else text  # equal empty answers would prove nothing


def test_generate_until_stops_at_the_tasks_stop_strings(untaught, media):
    lmm = harness_model(untaught, media)
    gen_kwargs = {"max_new_tokens": 8, "temperature": 0}
    [full] = lmm.generate_until([harness_request("generate_until", 0, "What is shown?", dict(gen_kwargs))])
    stop = full[3:5]
    [cut] = lmm.generate_until([harness_request("generate_until", 0, "What is shown?", {**gen_kwargs, "until": [stop]})])
    assert len(full) >= 5 and cut == full[: full.find(stop)]


def test_decoding_reads_the_tasks_generation_kwargs():
    assert decoding({}, 200) == (200, 0.0, 1.0, [])
    assert decoding({"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "until": "\n\n"}, 200) == (
        16, 0.7, 0.9, ["\n\n"])
    assert decoding({"temperature": 0.7, "do_sample": False, "until": ["", "."]}, 200) == (200, 0.0, 1.0, ["."])
    assert cut_at_stops("A. red\n\nmore", ["\n\n", "."]) == "A" and cut_at_stops("red", ["\n"]) == "red"


def test_visual_frames_of_paths_images_and_frame_lists(media, taught):
    settings = harness_model(taught, media).settings
    clip = visual_frames([str(media / "clip.mp4")], settings)
    torch.testing.assert_close(clip, load_media(media / "clip.mp4")[0], atol=0, rtol=0)
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    assert visual_frames([image], settings).shape == (settings.image_frames, 3, 224, 224)
    assert visual_frames([image, image, image], settings).shape == (3, 3, 224, 224)
    assert visual_frames([str(media / "photo.png")] * 2, settings).shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="no visual"):
        visual_frames([], settings)
    with pytest.raises(ValueError, match="got 2 visuals of type"):
        visual_frames([str(media / "clip.mp4"), {"array": [0.0]}], settings)


def test_text_only_and_multi_round_requests_are_refused(taught, media):
    lmm = harness_model(taught, media)
    unconditional = Instance(request_type="loglikelihood", arguments=("", " red"), idx=0,
                             metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="no document"):
        lmm.loglikelihood([unconditional])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lmm.generate_until_multi_round([])


TASK_YAML = """\
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
task: fovlm_toy
test_split: test
output_type: generate_until
doc_to_visual: !function toy.doc_to_visual
doc_to_text: !function toy.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, until: ["\\n"]}}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """\
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc):
    return doc["question"]
"""


@pytest.mark.slow
def test_the_harness_runs_fovlm_on_a_task(taught, media, tmp_path, monkeypatch):
    """lmms-eval's own evaluator (what ``python -m lmms_eval --model fovlm`` runs) on a local generation task."""
    import json

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"video": str(media / "clip.mp4"), "question": "What is shown?", "answer": "red"},
            {"video": str(media / "photo.png"), "question": "What is shown?", "answer": "blue"}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tasks / "toy.yaml").write_text(TASK_YAML.format(data=tmp_path / "toy.jsonl", cache=tmp_path / "datasets"))
    (tasks / "toy.py").write_text(TASK_UTILS)
    results = simple_evaluate(model="fovlm", model_args=f"pretrained={taught}", tasks=["fovlm_toy"], device="cpu",
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    answers = {sample["doc_id"]: sample["filtered_resps"] for sample in results["samples"]["fovlm_toy"]}
    assert answers == {0: ["red"], 1: ["red"]}  # what the model was taught to answer
    assert results["results"]["fovlm_toy"]["exact_match,none"] == pytest.approx(0.5)
