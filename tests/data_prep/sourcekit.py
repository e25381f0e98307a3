"""Test helpers: a small fixture of every source in its dataset's published layout."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

from prepkit import image_bytes, write_clip


def _csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def _llava(*texts: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": ("<video>\n" if i == 0 else "") + t}
            for i, t in enumerate(texts)]


# Each fixture writes the dataset's layout under ``root`` and returns (input, media or None, expected), where
# expected maps a sample's text (see ``sample_text``) to its frame count (0 for text-only), plus skipped reasons.


def fx_openvid(root):
    write_clip(root / "video" / "a.mp4", 3)
    write_clip(root / "video" / "sub" / "b.mp4", 5)
    # The published layout: the CSV under data/train/, the extracted clips under video/; input is the folder.
    _csv(root / "data" / "train" / "OpenVid-1M.csv", [
        {"video": "a.mp4", "caption": "A dog runs.", "aesthetic score": "5.1", "seconds": "3"},
        {"video": "b.mp4", "caption": "Waves roll in.", "aesthetic score": "4.9", "seconds": "5"}])
    return root, None, {"A dog runs.": 3, "Waves roll in.": 5}, {}


def fx_webvid(root):
    write_clip(root / "videos" / "041" / "1001.mp4", 4)
    write_clip(root / "videos" / "1002.mp4", 2)
    path = _csv(root / "results_2M_val.csv", [
        {"videoid": "1001", "contentUrl": "https://x/1001.mp4", "duration": "PT00H00M04S", "page_dir": "041",
         "name": "Aerial view of a city."},
        {"videoid": "1002", "contentUrl": "https://x/1002.mp4", "duration": "PT00H00M02S", "page_dir": "099",
         "name": "Close up of a flower."},
        {"videoid": "1003", "contentUrl": "https://x/1003.mp4", "duration": "PT00H00M09S", "page_dir": "099",
         "name": "Never downloaded."}])
    return path, None, {"Aerial view of a city.": 4, "Close up of a flower.": 2}, {"missing_file": 1}


def fx_vript(root):
    def clip(vid, n, title, content, voice="..."):
        return {"video_id": vid, "clip_id": f"{vid}-Scene-{n:03d}", "video_title": "t",
                "caption": {"shot_type": "close-up", "camera_movement": "pan", "content": content,
                            "scene_title": title}, "voiceover": [voice]}
    caps = root / "vript_captions"
    _json(caps / "abc_caption.json", {"meta": {"video_id": "abc", "video_title": "t", "num_clips": 2,
                                               "integrity": True},
                                      "data": {"abc-Scene-001": clip("abc", 1, "Opening", "A man waves."),
                                               "abc-Scene-002": clip("abc", 2, "Kitchen", "He cooks eggs.")}})
    _jsonl(caps / "short_caption.jsonl", [{"meta": {"video_id": "xyz"}, **clip("xyz", 7, "", "Rain falls.")}])
    write_clip(root / "clips" / "abc" / "abc-Scene-001.mp4", 2)
    write_clip(root / "clips" / "abc" / "abc-Scene-002.mp4", 6)
    write_clip(root / "clips" / "xyz" / "xyz-Scene-007.mp4", 1)
    return caps, root / "clips", {"Opening: A man waves.": 2, "Kitchen: He cooks eggs.": 6, "Rain falls.": 1}, {}


def fx_sharegpt4video(root):
    write_clip(root / "zip_folder" / "v1.mp4", 3)
    path = _json(root / "sharegpt4video_mix.json", [
        {"id": "v1", "video": "zip_folder/v1.mp4",
         "conversations": _llava("Describe the video.", "A cat sleeps.", "Is it moving?", "No.")},
        {"id": "img", "image": "coco/1.jpg", "conversations": _llava("What is this?", "A bus.")}])
    return path, None, {"Describe the video.|A cat sleeps.|Is it moving?|No.": 3}, {"bad_row": 1}


def fx_vista(root):
    write_clip(root / "videos" / "long" / "q1.mp4", 12, fps=1)
    write_clip(root / "videos" / "long" / "q2.mp4", 70, fps=1)
    path = _json(root / "anno" / "long_video_qa.json", [
        {"id": "q1", "video": "long/q1.mp4", "conversations": _llava("What happens at the end?", "A door opens.")},
        {"id": "q2", "video": "long/q2.mp4", "conversations": _llava("How many cars?", "Three.")}])
    return path, root / "videos", {"What happens at the end?|A door opens.": 12, "How many cars?|Three.": 64}, {}


def fx_llava_video(root):
    subset = root / "0_30_s_youtube_v0_1"
    write_clip(subset / "liwei_youtube_videos" / "videos" / "ytb_a.mp4", 7)
    _json(subset / "0_30_s_youtube_v0_1_cap_processed.json", [
        {"id": "ytb_a", "video": "liwei_youtube_videos/videos/ytb_a.mp4", "data_source": "0_30_s_youtube_v0_1",
         "conversations": _llava("Describe this video.", "A chef plates food.")}])
    _json(subset / "0_30_s_youtube_v0_1_oe_qa_processed.json", [
        {"id": "ytb_a", "video": "liwei_youtube_videos/videos/ytb_a.mp4", "data_source": "0_30_s_youtube_v0_1",
         "conversations": _llava("What colour is the plate?", "White.", "What food?", "Pasta.")},
        {"id": "broken", "video": "liwei_youtube_videos/videos/ytb_a.mp4", "conversations": "not a list"}])
    return subset, None, {"Describe this video.|A chef plates food.": 7,
                          "What colour is the plate?|White.|What food?|Pasta.": 7}, {"bad_row": 1}


def fx_cauldron(root):
    red, blue = image_bytes((60, 40), (220, 0, 0)), image_bytes((30, 30), (0, 0, 220))
    (root / "the_cauldron" / "nlvr2").mkdir(parents=True)
    (root / "the_cauldron" / "nlvr2" / "right.png").write_bytes(blue)
    _jsonl(root / "the_cauldron" / "ai2d" / "train-00000-of-00001.jsonl", [
        {"images": [{"bytes": _b64(red), "path": None}],
         "texts": [{"user": "What colour?", "assistant": "Red.", "source": "ai2d"},
                   {"user": "Sure?", "assistant": "Yes.", "source": "ai2d"}]}])
    _jsonl(root / "the_cauldron" / "nlvr2" / "train-00000-of-00001.jsonl", [
        {"images": [{"bytes": _b64(red)}, {"bytes": None, "path": "right.png"}],
         "texts": [{"user": "Are both red?", "assistant": "No.", "source": "nlvr2"}]},
        {"images": [], "texts": [{"user": "No image?", "assistant": "None."}]},
        "{this line is not JSON"])
    return root / "the_cauldron", None, {"What colour?|Red.|Sure?|Yes.": 1, "Are both red?|No.": 1}, {"bad_row": 2}


def fx_smoltalk(root):
    path = _jsonl(root / "data" / "all" / "train.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, *_turns("Hi!", "Hello.", "2+2?", "4.")],
         "source": "smol-magpie-ultra"},
        {"messages": _turns("Name a colour.", "Blue."), "source": "everyday-conversations"},
        {"messages": "not a list", "source": "x"}])
    return path.parent, None, {"Be brief.|Hi!|Hello.|2+2?|4.": 0, "Name a colour.|Blue.": 0}, {"bad_row": 1}


def fx_rlaif_v(root):
    path = _jsonl(root / "RLAIF-V-Dataset_000.jsonl", [
        {"ds_name": "OmniLMM", "image": {"bytes": _b64(image_bytes((50, 80))), "path": None},
         "question": "What is shown?", "chosen": "A red square.", "rejected": "A blue circle.", "idx": 17,
         "origin_dataset": "vqa", "origin_split": "train", "image_path": "x.jpg"},
        {"ds_name": "OmniLMM", "image": {"bytes": _b64(b"broken image bytes")}, "question": "Q?",
         "chosen": "a", "rejected": "b", "idx": 18},
        {"ds_name": "OmniLMM", "image": {"bytes": _b64(image_bytes())}, "question": "Q?", "chosen": "",
         "rejected": "b", "idx": 19}])
    return path, None, {"What is shown?|+A red square.|-A blue circle.": 1}, {"unreadable_image": 1, "bad_row": 1}


def fx_mvbench(root):
    write_clip(root / "video" / "star" / "Charades_v1_480" / "AB12.mp4", 20, fps=1)
    write_clip(root / "video" / "clevrer" / "video_validation" / "v_1.mp4", 5)
    _json(root / "json" / "action_sequence.json", [
        {"video": "AB12.mp4", "question": "What did the person do first?", "candidates": ["Sat.", "Ran.", "Ate."],
         "answer": "Ran.", "start": 4.0, "end": 10.0}])
    _json(root / "json" / "moving_direction.json", [
        {"video": "v_1.mp4", "question": "Where does the cube go?", "candidates": ["left", "right"],
         "answer": "left"},
        {"video": "v_1.mp4", "question": "Broken?", "candidates": ["a", "b"], "answer": "c"}])
    return root, None, {"What did the person do first?|Sat./Ran./Ate.|1|action_sequence": 6,
                        "Where does the cube go?|left/right|0|moving_direction": 5}, {"bad_row": 1}


def fx_videomme(root):
    write_clip(root / "data" / "fFjv93ACGo8.mp4", 9)
    path = _jsonl(root / "videomme" / "test-00000-of-00001.jsonl", [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many people appear?",
         "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "C"}])
    return path, None, {"How many people appear?|One./Two./Three./Four.|2|Counting Problem": 9}, {}


def fx_mlvu(root):
    write_clip(root / "MLVU" / "video" / "1_plotQA" / "movie1.mp4", 80, fps=1)
    _json(root / "MLVU" / "json" / "1_plotQA.json", [
        {"video": "movie1.mp4", "duration": 80.0, "question": "Why does the hero leave?",
         "candidates": ["To hide.", "To find his dog.", "To win."], "answer": "To find his dog.",
         "question_type": "plotQA"}])
    return root / "MLVU", None, {"Why does the hero leave?|To hide./To find his dog./To win.|1|plotQA": 64}, {}


FIXTURES = {name.removeprefix("fx_"): fn for name, fn in globals().items() if name.startswith("fx_")}


def sample_text(sample) -> str:
    if sample.caption is not None:
        return sample.caption
    if sample.choice is not None:
        c = sample.choice
        return f"{c.question}|{'/'.join(c.options)}|{c.answer}|{c.category}"
    text = "|".join(m.content for m in sample.messages)
    if sample.chosen is not None:
        text += f"|+{sample.chosen}|-{sample.rejected}"
    return text
