"""The foveated DINOv2 encoder: a patch pass with a per-layer K/V cache, and query passes that read it.

Patch pass (once per real frame, shared by every query pass): DINOv2's embeddings and layers run over the
frames exactly as ``Dinov2Model`` does, but each layer's keys and values are kept (computed once, by the
layer's own projections) so that query passes can attend to them later.

Deep query pass: a learned query is projected into DINO's width (no bias) and travels through every DINO layer
as one extra token, with that layer's own LN1, Q projection, output projection, LayerScale, LN2 and MLP. It
attends to the layer's cached 257 keys/values only: patches never see the query, the query never sees itself.
The final LayerNorm and ``output_proj`` turn it into one vector per frame. With k queries per frame each is such
a token, and they do not see each other: k independent readings of the same cached frame.

Both passes call each DINO layer as a module (:class:`FoveatedLayer`, whose forward runs either pass), so that what
acts on a module's forward (FSDP's ``fully_shard`` gathering a layer's parameters, activation checkpointing) sees
every use of the layer's weights.

Shallow query pass (ablation, ``deep_query=False``): one cross-attention of the projected query on the last
layer's key/value projections of the final features, then final LayerNorm and ``output_proj``.

Shapes: n frames, N = 1 + (H/14)*(W/14) DINO tokens (257 at 224 px), D DINO width, Dq query width,
h heads of width hd = D / h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Dinov2Model
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2LayerScale, Dinov2MLP

from fovlm.model.attention import attend


@dataclass
class PatchCache:
    """What the patch pass keeps for the query passes.

    Attributes:
        features: final-LayerNorm'd DINO output [n, N, D] (used by the shallow variant and for inspection).
        keys: one tensor per layer, [n, h, N, hd], already split into heads.
        values: one tensor per layer, [n, h, N, hd].
    """

    features: Tensor
    keys: list[Tensor]
    values: list[Tensor]

    @property
    def num_frames(self) -> int:
        """Number of frames n held in the cache."""
        return self.features.shape[0]

    def to(self, dtype: torch.dtype) -> PatchCache:
        """The same cache in ``dtype``."""
        return PatchCache(
            features=self.features.to(dtype),
            keys=[k.to(dtype) for k in self.keys],
            values=[v.to(dtype) for v in self.values],
        )

    def select(self, index: Tensor) -> PatchCache:
        """The cache restricted to the frames ``index`` (long [m]), in that order."""
        return PatchCache(
            features=self.features[index],
            keys=[k[index] for k in self.keys],
            values=[v[index] for v in self.values],
        )


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    """[n, L, h*hd] -> [n, h, L, hd]."""
    n, length, width = x.shape
    return x.view(n, length, width // head_dim, head_dim).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[n, h, L, hd] -> [n, L, h*hd]."""
    n, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * head_dim)


def _autocast_input(x: Tensor) -> Tensor:
    """``x`` in autocast's dtype when autocast is on (a LayerNorm output read by several linears): autocast casts
    an activation again for every linear that reads it, and each cast has its own backward."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x
    return x.to(torch.get_autocast_dtype(device))


def scaled_linear(x: Tensor, linear: nn.Linear, scale: nn.Module) -> Tensor:
    """``scale(linear(x))`` with DINOv2's LayerScale folded into the linear's weight and bias.

    The same numbers (up to rounding), but autograd keeps ``x`` (which the linear keeps anyway) and a scaled copy
    of the weight instead of the linear's whole output: worth it over a frame's 257 tokens, not for a few query
    tokens (docs/measured.md#memory-of-a-training-step).
    """
    if not isinstance(scale, Dinov2LayerScale):
        return scale(linear(x))
    lam = scale.lambda1  # [D]
    bias = None if linear.bias is None else linear.bias * lam
    return F.linear(x, linear.weight * lam[:, None], bias)


def _mlp(layer: Dinov2Layer, x: Tensor) -> Tensor:
    """LayerScale(MLP(x)) with the LayerScale folded into the MLP's output projection where it has one."""
    mlp = layer.mlp
    if not isinstance(mlp, Dinov2MLP):
        return layer.layer_scale2(mlp(x))
    return scaled_linear(mlp.activation_fn(mlp.fc1(x)), mlp.fc2, layer.layer_scale2)


def patch_layer(layer: Dinov2Layer, x: Tensor, kernel: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """One DINOv2 layer over all tokens of each frame, returning its keys and values as well.

    Equivalent to ``layer(x)`` (pre-norm attention + LayerScale, pre-norm MLP + LayerScale, drop path), with
    the Q/K/V projections computed exactly once.

    Args:
        layer: the DINOv2 layer whose modules are used.
        x: hidden states [n, N, D].
        kernel: the attention kernel (:mod:`fovlm.model.attention`).

    Returns:
        (new hidden states [n, N, D], keys [n, h, N, hd], values [n, h, N, hd]).
    """
    attn = layer.attention
    normed = _autocast_input(layer.norm1(x))  # [n, N, D], cast once for the three projections
    q = _split_heads(attn.q_proj(normed), attn.head_dim)  # [n, h, N, hd]
    k = _split_heads(attn.k_proj(normed), attn.head_dim)  # [n, h, N, hd]
    v = _split_heads(attn.v_proj(normed), attn.head_dim)  # [n, h, N, hd]
    dropout_p = attn.attention_dropout if layer.training else 0.0
    out, _ = attend(q, k, v, attn.scaling, dropout_p, kernel=kernel)
    x = x + layer.drop_path(scaled_linear(_merge_heads(out), attn.o_proj, layer.layer_scale1))  # [n, N, D]
    x = x + layer.drop_path(_mlp(layer, layer.norm2(x)))  # [n, N, D]
    return x, k, v


def query_layer(
    layer: Dinov2Layer, h: Tensor, k: Tensor, v: Tensor, return_weights: bool = False, kernel: str = "auto"
) -> tuple[Tensor, Tensor | None]:
    """The query tokens through one DINOv2 layer, attending to that layer's cached keys/values only (the k
    queries of a frame do not see each other).

    Args:
        layer: the DINOv2 layer whose modules are used.
        h: query hidden states [n, k, D].
        k: cached keys [n, h, N, hd].
        v: cached values [n, h, N, hd].
        return_weights: also return the attention weights [n, h, k, N] (float32, in the autograd graph).
        kernel: the attention kernel (:mod:`fovlm.model.attention`).
    """
    attn = layer.attention
    q = _split_heads(attn.q_proj(layer.norm1(h)), attn.head_dim)  # [n, h, k, hd]
    dropout_p = attn.attention_dropout if layer.training else 0.0
    out, weights = attend(q.to(k.dtype), k, v, attn.scaling, dropout_p, return_weights, kernel)  # [n, h, k, hd]
    # LayerScale stays unfolded here: for a few tokens the scaled weight copies would outweigh the outputs.
    h = h + layer.drop_path(layer.layer_scale1(attn.o_proj(_merge_heads(out))))  # [n, k, D]
    h = h + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(h))))  # [n, k, D]
    return h, weights


class FoveatedLayer(Dinov2Layer):
    """A DINOv2 layer whose forward also runs the foveated encoder's two passes.

    It adds no state: the submodules, their names (so state dicts and checkpoints) and Hugging Face's own forward
    are those of :class:`Dinov2Layer`. :func:`foveated_layers` turns a backbone's layers into this class in place.
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cached: tuple[Tensor, Tensor] | None = None,
        patch_pass: bool = False,
        recompute: bool = False,
        return_weights: bool = False,
        kernel: str = "auto",
        **kwargs,
    ):
        """Hugging Face's layer forward by default; with ``patch_pass`` :func:`patch_layer` (-> hidden states, keys,
        values; ``recompute``: activations recomputed in backward, inside the forward so that hooks on the layer
        such as FSDP's run once); with ``cached`` (this layer's keys and values) :func:`query_layer` (-> hidden
        states, weights)."""
        if patch_pass and recompute:
            return checkpoint(patch_layer, self, hidden_states, kernel, use_reentrant=False)
        if patch_pass:
            return patch_layer(self, hidden_states, kernel)
        if cached is not None:
            return query_layer(self, hidden_states, cached[0], cached[1], return_weights, kernel)
        return super().forward(hidden_states, attention_mask, **kwargs)


def foveated_layers(dino: Dinov2Model) -> nn.ModuleList:
    """``dino``'s layers as :class:`FoveatedLayer` (in place, the same objects and weights), returned."""
    for layer in dino.encoder.layer:
        if not isinstance(layer, Dinov2Layer):
            raise TypeError(f"expected DINOv2 layers, got {type(layer).__name__}")
        if not isinstance(layer, FoveatedLayer):
            layer.__class__ = FoveatedLayer
    return dino.encoder.layer


class FoveatedEncoder(nn.Module):
    """DINOv2 with a per-layer K/V cache and a learned query that reads one token per frame."""

    def __init__(self, dino: Dinov2Model, query_dim: int = 384, deep_query: bool = True) -> None:
        """Wrap a DINOv2 backbone.

        Args:
            dino: a Hugging Face ``Dinov2Model`` (pretrained or random); its weights are used, not copied.
            query_dim: width Dq of the incoming query vectors.
            deep_query: True for the deep query pass through every layer; False for the shallow ablation.
        """
        super().__init__()
        foveated_layers(dino)
        self.dino = dino
        self.query_dim = query_dim
        self.deep_query = deep_query
        width = dino.config.hidden_size
        # No bias: a bias would give every query a shared component that pulls all queries together.
        self.query_input_proj = nn.Linear(query_dim, width, bias=False)
        self.output_proj = nn.Linear(width, width)
        self.patch_checkpointing = False
        # None, or a dtype the patch pass runs in under autocast (its outputs come back in the frames' dtype).
        self.patch_dtype: torch.dtype | None = None
        # auto, sdpa or matmul (fovlm.model.attention): auto picks by device and dtype.
        self.attention_kernel = "auto"

    @property
    def hidden_size(self) -> int:
        """DINO width D (also the width of the output vectors)."""
        return self.dino.config.hidden_size

    @property
    def layers(self) -> nn.ModuleList:
        """DINOv2's transformer layers (:class:`FoveatedLayer`)."""
        return self.dino.encoder.layer

    def encode_patches(self, frames: Tensor) -> PatchCache:
        """Patch pass over real frames: final features and every layer's keys/values.

        With ``patch_dtype`` set (and no autocast already active) the pass runs under autocast to that dtype,
        e.g. bfloat16 for a frozen backbone trained around in float32, and its outputs come back in the dtype of
        the encoder's own weights, so the query passes and everything after them keep their precision.

        Args:
            frames: ImageNet-normalised frames [n, 3, H, W] (n may be 0).
        """
        device = frames.device.type
        if self.patch_dtype is not None and not torch.is_autocast_enabled(device):
            with torch.autocast(device, dtype=self.patch_dtype):
                cache = self._encode_patches(frames)
            return cache.to(self.output_proj.weight.dtype)
        return self._encode_patches(frames)

    def _encode_patches(self, frames: Tensor) -> PatchCache:
        x = self.dino.embeddings(frames)  # [n, N, D]
        keys, values = [], []
        for layer in self.layers:
            recompute = self.patch_checkpointing and torch.is_grad_enabled()
            x, k, v = layer(x, patch_pass=True, recompute=recompute, kernel=self.attention_kernel)
            keys.append(k)
            values.append(v)
        return PatchCache(features=self.dino.layernorm(x), keys=keys, values=values)

    def query_attend(
        self, queries: Tensor, cache: PatchCache, return_attention: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Foveated vectors: the queries of row i read frame i of ``cache``, each independently of the others.

        Args:
            queries: query vectors [n, Dq] (one per cached frame) or [n, k, Dq] (k per frame).
            cache: the patch pass of those n frames.
            return_attention: also return the attention weights (float32, in the graph): one [n, h, k, N] per
                layer for the deep pass, a single-element list for the shallow pass (k = 1 for [n, Dq] queries).

        Returns:
            (vectors [n, D] or [n, k, D], as the queries are shaped; attention weights or None).
        """
        if queries.shape[0] != cache.num_frames:
            raise ValueError(f"{queries.shape[0]} queries for {cache.num_frames} cached frames")
        per_frame = queries if queries.dim() == 3 else queries.unsqueeze(1)  # [n, k, Dq]
        if self.deep_query:
            z, weights = self._deep_query(per_frame, cache, return_attention)
        else:
            z, weights = self._shallow_query(per_frame, cache, return_attention)
        return (z if queries.dim() == 3 else z.squeeze(1)), weights

    def _deep_query(self, queries: Tensor, cache: PatchCache, return_attention: bool):
        """The queries [n, k, Dq] as extra tokens through every DINO layer (see module docstring) -> [n, k, D]."""
        h = self.query_input_proj(queries)  # [n, k, D]
        weights = []
        for layer, k, v in zip(self.layers, cache.keys, cache.values, strict=True):
            h, w = layer(h, cached=(k, v), return_weights=return_attention, kernel=self.attention_kernel)
            weights.append(w)
        z = self.output_proj(self.dino.layernorm(h))  # [n, k, D]
        return z, (weights if return_attention else None)

    def _shallow_query(self, queries: Tensor, cache: PatchCache, return_attention: bool):
        """One cross-attention of the projected query on the final features, as in the fVLM original's ablation."""
        last = self.layers[-1]
        attn = last.attention
        normed = last.norm1(cache.features)  # [n, N, D]
        k = _split_heads(attn.k_proj(normed), attn.head_dim)  # [n, h, N, hd]
        v = _split_heads(attn.v_proj(normed), attn.head_dim)  # [n, h, N, hd]
        q = _split_heads(self.query_input_proj(queries), attn.head_dim)  # [n, h, k, hd]
        out, w = attend(q.to(k.dtype), k, v, attn.scaling, 0.0, return_attention, self.attention_kernel)
        z = self.output_proj(self.dino.layernorm(_merge_heads(out)))  # [n, k, D]
        return z, ([w] if return_attention else None)
