"""FoveatedEncoder: patch pass parity with Dinov2Model, deep query pass parity with a masked plain computation."""

import torch
import torch.nn.functional as F
from tiny_models import QUERY_DIM, TOL, random_frames

from fovlm.model.encoder import FoveatedEncoder


def plain_deep_query(encoder: FoveatedEncoder, frames: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The deep query pass written plainly: DINO's own layers run on [patches ; query] with an attention mask.

    Patches never see the query (column N masked for rows < N); the query never sees itself (entry [N, N]).
    """
    dino = encoder.dino
    x = torch.cat([dino.embeddings(frames), encoder.query_input_proj(queries)[:, None]], dim=1)  # [n, N+1, D]
    n_tok = x.shape[1]
    mask = torch.zeros(n_tok, n_tok)
    mask[:, -1] = float("-inf")  # nobody attends to the query token, the query included
    for layer in dino.encoder.layer:
        x = layer(x, attention_mask=mask[None, None])
    return encoder.output_proj(dino.layernorm(x[:, -1]))  # [n, D]


def test_patch_pass_equals_dinov2_forward(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM)
    frames = random_frames(3)
    cache = encoder.encode_patches(frames)
    torch.testing.assert_close(cache.features, tiny_dino(frames).last_hidden_state, **TOL)
    assert len(cache.keys) == len(cache.values) == tiny_dino.config.num_hidden_layers
    assert cache.keys[0].shape == (3, 4, 257, 16)  # [n, heads, N, head_dim]


def test_deep_query_equals_masked_plain_computation(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM)
    frames, queries = random_frames(3), torch.randn(3, QUERY_DIM)
    z, weights = encoder.query_attend(queries, encoder.encode_patches(frames))
    assert z.shape == (3, 64) and weights is None
    torch.testing.assert_close(z, plain_deep_query(encoder, frames, queries), **TOL)


def test_attention_weights_path_matches_sdpa_path(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM)
    cache = encoder.encode_patches(random_frames(2))
    queries = torch.randn(2, QUERY_DIM)
    z_sdpa, _ = encoder.query_attend(queries, cache)
    z_w, weights = encoder.query_attend(queries, cache, return_attention=True)
    torch.testing.assert_close(z_w, z_sdpa, **TOL)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 1, 257)
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(2, 4, 1))


def test_query_bias_free_and_queries_differ(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM)
    assert encoder.query_input_proj.bias is None
    frame = random_frames(1).expand(2, -1, -1, -1)  # the same frame twice
    z, _ = encoder.query_attend(torch.randn(2, QUERY_DIM), encoder.encode_patches(frame))
    assert F.cosine_similarity(z[0], z[1], dim=0) < 0.9


def test_shallow_query_is_one_cross_attention_on_final_features(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM, deep_query=False)
    frames, queries = random_frames(2), torch.randn(2, QUERY_DIM)
    z, weights = encoder.query_attend(queries, encoder.encode_patches(frames), return_attention=True)
    last = tiny_dino.encoder.layer[-1]
    feats = last.norm1(tiny_dino(frames).last_hidden_state)  # [n, N, D]
    k = last.attention.k_proj(feats).view(2, 257, 4, 16)  # [n, N, h, hd]
    v = last.attention.v_proj(feats).view(2, 257, 4, 16)
    q = encoder.query_input_proj(queries).view(2, 4, 16)  # [n, h, hd]
    attn = torch.softmax(torch.einsum("nhd,nkhd->nhk", q, k) / 4.0, dim=-1)  # scale 1/sqrt(16)
    out = torch.einsum("nhk,nkhd->nhd", attn, v).reshape(2, 64)
    torch.testing.assert_close(z, encoder.output_proj(tiny_dino.layernorm(out)), **TOL)
    torch.testing.assert_close(weights[0][:, :, 0], attn, **TOL)


def test_empty_frame_batch(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM)
    cache = encoder.encode_patches(random_frames(0))
    z, _ = encoder.query_attend(torch.randn(0, QUERY_DIM), cache)
    assert cache.num_frames == 0 and z.shape == (0, 64)


def test_patch_checkpointing_keeps_values_and_gradients(tiny_dino):
    encoder = FoveatedEncoder(tiny_dino, query_dim=QUERY_DIM)
    frames, queries = random_frames(2), torch.randn(2, QUERY_DIM)

    def grads():
        encoder.zero_grad()
        z, _ = encoder.query_attend(queries, encoder.encode_patches(frames))
        z.square().sum().backward()
        return z.detach(), [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    z_plain, g_plain = grads()
    encoder.patch_checkpointing = True
    z_ckpt, g_ckpt = grads()
    torch.testing.assert_close(z_ckpt, z_plain)
    assert len(g_plain) == len(g_ckpt) > 0
    for a, b in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(a, b)
