"""The growing KV cache layer holds what transformers' concatenating layer holds, through appends, crops and
removals, and reallocates only when full."""

import torch
from transformers.cache_utils import DynamicLayer

from fovlm.model.stream_cache import GrowingLayer, growing_cache


def kv(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, n, 8, generator=gen), torch.randn(1, 3, n, 8, generator=gen)


def test_appends_and_crops_match_the_concatenating_layer():
    grown, plain = GrowingLayer(), DynamicLayer()
    for step, n in enumerate([5, 1, 1, 300, 2, 1]):
        k, v = kv(n, step)
        for layer in (grown, plain):
            out = layer.update(k, v)
        assert torch.equal(out[0], plain.keys) and torch.equal(grown.keys, plain.keys)
        assert torch.equal(grown.values, plain.values) and grown.get_seq_length() == plain.get_seq_length()
        if step == 3:
            grown.crop(-7), plain.crop(-7)
    assert grown._key_buffer.shape[-2] == 512  # 256, then doubled once for 306 positions


def test_buffers_are_reused_until_full():
    layer = GrowingLayer()
    layer.update(*kv(1, 0))
    buffer = layer._key_buffer
    for step in range(1, 256):
        layer.update(*kv(1, step))
    assert layer._key_buffer is buffer and layer.get_seq_length() == 256
    layer.update(*kv(1, 999))
    assert layer._key_buffer is not buffer and layer._key_buffer.shape[-2] == 512


def test_remove_closes_the_gap_with_the_given_keys():
    layer = GrowingLayer()
    k, v = kv(10, 1)
    layer.update(k, v)
    replacement = torch.full((1, 3, 4, 8), 7.0)
    layer.remove(2, 6, replacement)
    assert layer.get_seq_length() == 6
    assert torch.equal(layer.keys, torch.cat([k[..., :2, :], replacement], -2))
    assert torch.equal(layer.values, torch.cat([v[..., :2, :], v[..., 6:, :]], -2))


def test_the_cache_makes_one_growing_layer_per_decoder_layer(tiny_llm):
    cache = growing_cache()
    with torch.no_grad():
        tiny_llm(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
    assert len(cache.layers) == tiny_llm.config.num_hidden_layers
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers) and cache.get_seq_length() == 3


def test_a_reserved_capacity_is_never_reallocated():
    layer = GrowingLayer(capacity=1000)
    layer.update(*kv(1, 0))
    buffer = layer._key_buffer
    assert buffer.shape[-2] == 1000
    for step in range(1, 1000):
        layer.update(*kv(1, step))
    assert layer._key_buffer is buffer and layer.get_seq_length() == 1000
    layer.update(*kv(1, 1000))  # past it, doubling as without a reservation
    assert layer._key_buffer.shape[-2] == 2000


def test_sessions_reserve_what_their_policy_can_reach(tiny_vlm):
    from fovlm.model.streaming import ANSWER_ROOM, CachePolicy, StreamingSession

    full = StreamingSession(tiny_vlm, CachePolicy(kind="full"))
    full.push(torch.randn(3, 224, 224))
    window = StreamingSession(tiny_vlm, CachePolicy(sink_frames=2, window_frames=10, evict_frames=3),
                              head_ids=torch.tensor([5, 6, 7]))
    assert full.cache.layers[0].capacity == tiny_vlm.llm.config.max_position_embeddings
    assert window.cache.layers[0].capacity == 3 + 15 * tiny_vlm.active_queries + ANSWER_ROOM
