"""Ask a model about a video, an image or a folder of frames: ``fovlm predict MEDIA --model M --prompt P``.

    fovlm predict clip.mp4 --model exported/fovlm-135m --prompt "What happens in this video?"
    fovlm predict photo.png --model runs/stage2/checkpoints/last.ckpt --prompt "Describe this." --temperature 0.7

Frames are chosen as in training (:mod:`fovlm.data.frames`): 1 FPS, at most 64 spread uniformly over longer
videos, resized to cover 224 px and centre-cropped; a single image is replicated to 8 frames; a folder is
taken as frames already sampled at 1 FPS, in name order. Frame size, frame cap and image replication default
to the values the model was trained with (stored by ``fovlm export``, or the checkpoint's DataModule). A video is
decoded one frame at a time as the model reads it, and every frame goes through a streaming session
(:class:`fovlm.model.streaming.StreamingSession`, full cache): the autoregressive visual pass, one frame's patch
pass held at a time, then greedy or sampled decoding until ``<|im_end|>``. A file that cannot be decoded ends
the command with a message naming it and exit code 1.

Options may come before or after the media path (``fovlm predict --model M clip.mp4``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from fovlm.data.chat import SYSTEM_PROMPT
from fovlm.data.contract import FRAME_SETTINGS, FrameSettings
from fovlm.data.frame_stream import video_frames
from fovlm.data.frames import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    FrameDecodeError,
    decode_image,
    decode_images,
    decode_video,
    normalize,
    replicate_image,
    select_frame_indices,
)
from fovlm.model.checkpoint import CheckpointError
from fovlm.model.generate import Sampling
from fovlm.model.pretrained import load_any, use_queries
from fovlm.model.streaming import CachePolicy, StreamingSession

END_OF_TURN = "<|im_end|>"


class MediaError(ValueError):
    """A media path that cannot be used; the message names it."""


def load_media(
    path: str | Path,
    fps: float = FRAME_SETTINGS.fps,
    max_frames: int = FRAME_SETTINGS.max_frames,
    image_frames: int = FRAME_SETTINGS.image_frames,
    size: int = FRAME_SETTINGS.frame_size,
) -> tuple[Tensor, str]:
    """Frames of a video file, an image file or a folder of frames -> (uint8 [T, 3, size, size], media kind)."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path} does not exist")
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise MediaError(f"folder {path} holds no frame image ({', '.join(IMAGE_SUFFIXES)})")
            keep = select_frame_indices(len(files), max_frames)
            return decode_images([files[i].read_bytes() for i in keep], size), "video"
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return replicate_image(decode_image(path.read_bytes(), size)[None], image_frames), "image"
        if suffix in VIDEO_SUFFIXES:
            return decode_video(path.read_bytes(), size, fps, max_frames), "video"
    except FrameDecodeError as err:
        raise MediaError(f"{path}: {err}") from err
    raise MediaError(f"{path}: unsupported file type {path.suffix!r} (video: {', '.join(VIDEO_SUFFIXES)}; "
                     f"image: {', '.join(IMAGE_SUFFIXES)}; or a folder of frames)")


def prompt_ids(tokenizer, prompt: str, system_prompt: str = SYSTEM_PROMPT) -> Tensor:
    """The chat up to the assistant's turn (system, user, ``<|im_start|>assistant\\n``) as long [P]."""
    return _rendered(tokenizer, prompt, system_prompt, generation_prompt=True)


def question_length(tokenizer, prompt: str, system_prompt: str = SYSTEM_PROMPT) -> int:
    """Tokens of :func:`prompt_ids` that are the system and user turns (what a question-first model reads before
    the frames)."""
    return len(_rendered(tokenizer, prompt, system_prompt, generation_prompt=False))


def _rendered(tokenizer, prompt: str, system_prompt: str, generation_prompt: bool) -> Tensor:
    turns = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: ``<|im_end|>`` (and the tokenizer's EOS when it is another token)."""
    ids = {tokenizer.convert_tokens_to_ids(END_OF_TURN)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def answer(
    model,
    tokenizer,
    media: str | Path | Tensor | Iterable[Tensor],
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The model's answer to ``prompt`` about ``media``: a path, uint8 frames [T, 3, H, W], or any iterable of
    uint8 frames [3, H, W] (e.g. :func:`fovlm.data.frame_stream.video_frames`, decoded as they are read).

    The frames go one at a time through a :class:`fovlm.model.streaming.StreamingSession` (full cache), so no
    more than one frame's patch pass is ever held; the answer is the offline autoregressive one.
    """
    frames = load_media(media)[0] if isinstance(media, str | Path) else media
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = prompt_ids(tokenizer, prompt)
    question_len = question_length(tokenizer, prompt) if model.question_first else 0
    session = StreamingSession(model, CachePolicy("full"), ids[:question_len] if question_len else None)
    for frame in frames:
        session.push(normalize(frame[None])[0].to(device))
    result = session.answer(ids[question_len:], stop_ids(tokenizer), max_new_tokens,
                            Sampling(temperature, top_p, generator))
    return tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()


def media_frames(path: str | Path, settings: FrameSettings) -> Iterable[Tensor]:
    """The frames ``fovlm predict`` reads: a video file decoded one frame at a time as it is read (at most
    ``max_frames``, spread over a longer video), else :func:`load_media`'s frames."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        stream = video_frames(path, settings.fps, settings.frame_size, max_frames=settings.max_frames, spread=True)
        return (item.frame for item in stream)
    return load_media(path, max_frames=settings.max_frames, image_frames=settings.image_frames,
                      size=settings.frame_size)[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fovlm predict", description="Answer a prompt about a video or image.")
    parser.add_argument("media", help="video file (.mp4 ...), image file (.png/.jpg ...) or folder of frames")
    parser.add_argument("--model", required=True, help="exported folder or Lightning checkpoint (.ckpt)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass for sampling")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--frame-size", type=int, help="frame side in pixels (default: as the model was trained)")
    parser.add_argument("--max-frames", type=int, help="most frames of a video (default: as trained)")
    parser.add_argument("--num-queries", type=int,
                        help="visual tokens per frame k, 1..the model's num_queries (default: all of them)")
    parser.add_argument("--image-frames", type=int, help="frames an image is replicated to (default: as trained)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fovlm predict MEDIA --model M --prompt P``; prints the answer, returns the exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        model, tokenizer, data = load_any(args.model, args.device, args.tokenizer)
        use_queries(model, args.num_queries, args.model)
        settings = data.overridden(args.frame_size, args.max_frames, args.image_frames)
        frames = media_frames(args.media, settings)
        text = answer(model, tokenizer, frames, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                      args.seed)
    except (MediaError, FrameDecodeError, CheckpointError, FileNotFoundError) as err:
        print(f"fovlm predict: error: {err}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
