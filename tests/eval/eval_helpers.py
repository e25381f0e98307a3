"""Helpers shared by the evaluation tests: tiny random FoveatedVLMs and a small multiple-choice shard."""

import io
import json

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.model.loading import tiny_llm_config, tiny_vision_config
from fovlm.model.vlm import FoveatedVLM


def make_tiny_vlm(seed: int = 0) -> FoveatedVLM:
    """Hidden 64, 2 layers on both sides, query width 32, eval mode."""
    torch.manual_seed(seed)
    return FoveatedVLM(Dinov2Model(tiny_vision_config()), LlamaForCausalLM(tiny_llm_config()), query_dim=32).eval()


def export_taught_model(folder, tokenizer, answer: str = "red"):
    """Export a tiny model taught (LLM side only, a few steps) to answer ``answer`` to any question about any clip."""
    from fovlm.data.chat import render_chat
    from fovlm.export import export_model
    from fovlm.losses import AnswerOnlyCE

    model = make_tiny_vlm(seed=4)
    ids, roles = render_chat(tokenizer, [{"role": "user", "content": "What is shown?"},
                                         {"role": "assistant", "content": answer}])
    generator = torch.Generator().manual_seed(4)
    text = {"input_ids": torch.tensor([ids] * 2), "attention_mask": torch.ones(2, len(ids), dtype=torch.long),
            "roles": torch.tensor([roles] * 2)}
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(30):
        # a clip of noise and one of a single colour, new each step: the answer must not depend on the frames
        colour = torch.randn(1, 3, 1, 1, generator=generator).expand(2, 3, 224, 224)
        frames = torch.cat([torch.randn(1, 3, 224, 224, generator=generator), colour])
        batch = {"frames": frames, "num_frames": torch.tensor([1, 2]), **text}
        loss = AnswerOnlyCE()(model, batch, mode="coarse_fine").loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    export_model(model.eval(), tokenizer, folder)
    return folder


def png_bytes(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mcq_shard(path) -> str:
    """A shard with an image question, a 3-frame video question and a sample whose frame is corrupt."""
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "img0", "json": json.dumps({
            "source": "toy", "media": "image", "question": "What colour is it?", "options": ["red", "blue"],
            "answer": 0, "category": "colour"}).encode(), "png": png_bytes((255, 0, 0))})
        video = {"__key__": "vid0", "json": json.dumps({
            "source": "toy", "media": "video", "question": "Which way?", "options": ["left", "right", "up"],
            "answer": 2, "category": "motion", "answer_region": {"box": [0.5, 0.0, 1.0, 0.5], "from": 0}}).encode()}
        for t in range(3):
            video[f"{t:03d}.png"] = png_bytes((0, 80 * t, 0))
        sink.write(video)
        sink.write({"__key__": "bad0", "json": json.dumps({
            "source": "toy", "media": "image", "question": "Broken?", "options": ["yes", "no"],
            "answer": 1}).encode(), "jpg": b"not a jpeg"})
    return str(path)


def mp4_bytes(num_frames: int, fps: int = 4, size: tuple[int, int] = (64, 48)) -> bytes:
    """An H.264 mp4 whose frame i has a green level of 20 * i."""
    import av

    w, h = size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(num_frames):
            array = np.zeros((h, w, 3), dtype=np.uint8)
            array[..., 1] = min(255, 20 * i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_sft_shard(path) -> str:
    """Two question-answer samples from two sources (an image and a 2-frame video)."""
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "s0", "json": json.dumps({
            "source": "alpha", "media": "image", "messages": [
                {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Red."}]}).encode(),
            "png": png_bytes((255, 0, 0))})
        sink.write({"__key__": "s1", "json": json.dumps({
            "source": "beta", "media": "video", "messages": [
                {"role": "user", "content": "Which way does it move?"},
                {"role": "assistant", "content": "To the left."}]}).encode(),
            "000.png": png_bytes((0, 0, 255)), "001.png": png_bytes((0, 0, 128))})
    return str(path)


class PatchPasses:
    """Counts the DINO patch passes (calls of the embeddings) and the frames they encode."""

    def __init__(self, model):
        self.calls, self.frames = 0, 0
        model.encoder.dino.embeddings.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1
        self.frames += inputs[0].shape[0]
