"""FoveatedVLM: DINOv2 with learned queries (FoveatedEncoder) feeding k visual tokens per frame to a causal LM.

New parameters on top of the two pretrained networks: ``encoder.query_input_proj`` (no bias),
``encoder.output_proj``, the connector ``dino_to_llm`` (its output scaled by ``visual_scale``), the query head
``llm_to_query`` and the query vectors ``q_static`` / ``q_init`` [K, Dq] (standard normal: std 1), K =
``num_queries``. The model reads frames with its first k <= K of them (:meth:`FoveatedVLM.use_queries`; k = K
unless set), so that one model trained with several budgets serves each; k = 1 is one token per frame.

Sequence layout (:mod:`fovlm.model.layout`): sample i is [its T_i * k visual tokens, its S_i text tokens] at
positions 0, 1, ... with all padding on the right (frame t's j-th token at t * k + j); a text-only sample has no
visual token. No sample sees another's padding, so outputs are batch-invariant. :meth:`FoveatedVLM.use_packing`
packs the samples of the coarse and fine LLM passes into shared rows (each sample attending only to itself).

Modes (``forward(mode=...)``); every mode returns lm_head logits over text positions only:
    coarse_only     q_static on every frame -> tokens -> LLM over [tokens ; text].
    coarse_fine     coarse tokens -> LLM over the visual tokens only -> query head -> frame t's j-th query is
                    the one from frame t-1's j-th visual position (frame 0: q_init) -> fine tokens -> LLM over
                    [fine ; text].
    autoregressive  q_init -> frame 0 -> one cached LLM step -> queries -> frame 1 ... (the LLM KV cache grows by
                    k slots per frame; nothing is recomputed), then the text on top of the cache.

Shapes: B samples, F = sum(num_frames) real frames (concatenated in sample order), S text width, L sequence
width, Dv DINO width, Dq query width, Dl LLM width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import Dinov2Model, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from fovlm.model.encoder import FoveatedEncoder, PatchCache
from fovlm.model.exported import load_exported
from fovlm.model.layout import (
    assemble,
    build_layout,
    check_batch,
    frame_order,
    frame_starts,
    gather_text,
    pad_right,
    predicting_index,
    select_rows,
    shift_queries,
    split_text,
)
from fovlm.model.outputs import ARPrefix, TextInput, VisualTokens, VLMOutput
from fovlm.model.prompt import autoregressive_text

MODES = ("coarse_only", "coarse_fine", "autoregressive")


# --------------------------------------------------------------------------------------------------- model


class FoveatedVLM(nn.Module):
    """DINOv2 + learned foveated queries + causal LM, k visual tokens per frame (k = 1 by default)."""

    def __init__(
        self,
        vision: Dinov2Model,
        llm: PreTrainedModel,
        query_dim: int = 384,
        visual_scale: float = 0.14,
        deep_query: bool = True,
        num_queries: int = 1,
        question_first: bool = False,
    ) -> None:
        """Compose a DINOv2 backbone and a causal LM.

        Args:
            vision: Hugging Face ``Dinov2Model`` (pretrained or random).
            llm: Hugging Face causal LM (``AutoModelForCausalLM``); called with ``inputs_embeds`` only.
            query_dim: width Dq of the query vectors.
            visual_scale: factor on the connector output, matching the LLM's token embedding scale (SmolLM2: 0.14).
            deep_query: deep query pass through every DINO layer (True) or the shallow ablation (False).
            num_queries: K, the most visual tokens per frame: ``q_static`` and ``q_init`` hold K queries each, of
                which the first k (:meth:`use_queries`, K unless set) read each frame.
            question_first: the layout the model was trained with: the system turn and the first user turn
                before the visual tokens (callers pass ``visual_at``, e.g. ``fovlm.data.roles.question_end``),
                so that every query the LLM writes has read the question; False: visual tokens first.
        """
        if num_queries < 1:
            raise ValueError(f"num_queries must be at least 1, got {num_queries}")
        super().__init__()
        self.encoder = FoveatedEncoder(vision, query_dim=query_dim, deep_query=deep_query)
        self.llm = llm
        self.query_dim = query_dim
        self.visual_scale = visual_scale
        llm_width = llm.config.get_text_config().hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.hidden_size, llm_width)
        self.llm_to_query = nn.Linear(llm_width, query_dim)
        # Std 1: with small queries every frame is read with near-uniform attention and foveation never starts.
        self.q_static = nn.Parameter(torch.randn(num_queries, query_dim))
        self.q_init = nn.Parameter(torch.randn(num_queries, query_dim))
        self.active_queries = num_queries
        self.question_first = question_first
        self.pack_tokens: int | None = None

    @property
    def num_queries(self) -> int:
        """K, the most queries per frame the model holds."""
        return self.q_static.shape[0]

    def use_queries(self, k: int) -> None:
        """Read every frame with the first ``k`` static / initial queries from now on (1 <= k <= K)."""
        if not 1 <= k <= self.num_queries:
            raise ValueError(f"k must be between 1 and num_queries={self.num_queries}, got {k}")
        self.active_queries = k

    def use_packing(self, pack_tokens: int | None) -> None:
        """Pack the samples of the coarse_only / coarse_fine LLM passes (and DPO pairs) into rows of
        max(pack_tokens, longest sample) positions (:mod:`fovlm.model.packing`); None: one sample per row."""
        if pack_tokens is not None and pack_tokens < 1:
            raise ValueError(f"pack_tokens must be at least 1 (or None), got {pack_tokens}")
        self.pack_tokens = pack_tokens

    @property
    def static_queries(self) -> Tensor:
        """The k static queries in use [k, Dq] (the coarse pass's)."""
        return self.q_static[: self.active_queries]

    @property
    def initial_queries(self) -> Tensor:
        """The k queries of every sample's first frame in the fine and autoregressive passes [k, Dq]."""
        return self.q_init[: self.active_queries]

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> FoveatedVLM:
        """Load a folder written by ``fovlm export`` (safetensors weights + config) onto ``device``, in eval mode:
        the LLM and DINOv2 rebuilt from the folder's configs (no hub, no Lightning), weights loaded strictly, nothing
        unpickled (:mod:`fovlm.model.exported`)."""
        return load_exported(path, cls, device)

    # ---------------------------------------------------------------------------------------- building blocks

    def set_gradient_checkpointing(self, llm: bool = True, vision: bool = True) -> None:
        """Recompute activations in backward: HF's checkpointing for the LLM, per-layer for the patch pass."""
        if llm:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif self.llm.is_activation_checkpointing:
            self.llm.activation_checkpointing_disable()
        self.encoder.patch_checkpointing = vision

    def encode_patches(self, frames: Tensor) -> PatchCache:
        """Patch pass over real frames [F, 3, H, W]; shared by every query pass of the batch."""
        return self.encoder.encode_patches(frames)

    def connector(self, z: Tensor) -> Tensor:
        """DINO vectors [n, Dv] -> LLM token embeddings [n, Dl]."""
        return self.visual_scale * self.dino_to_llm(z.to(self.dino_to_llm.weight.dtype))

    def query_head(self, hidden: Tensor) -> Tensor:
        """Final-normed LLM hidden states [n, Dl] -> next queries [n, Dq]."""
        # The LLM may hold other weights' dtype than the new modules (e.g. bf16 LLM, fp32 head) outside autocast.
        return self.llm_to_query(hidden.to(self.llm_to_query.weight.dtype))

    def embed_text(self, input_ids: Tensor) -> Tensor:
        """Token ids [B, S] -> LLM input embeddings [B, S, Dl]."""
        return self.llm.get_input_embeddings()(input_ids)

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states [..., Dl] -> logits [..., V]."""
        return self.llm.get_output_embeddings()(hidden)

    def llm_hidden(
        self,
        embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: Cache | None = None,
    ) -> Tensor:
        """The LLM backbone (no lm_head) -> final-normed hidden states [B, L, Dl].

        Args:
            embeds: input embeddings [B, L, Dl].
            attention_mask: long [B, past + L] (keys), 1 where a key may be attended to; None (no cache): causal,
                each run of consecutive positions its own sequence (a packed layout).
            position_ids: long [B, L].
            past_key_values: a cache to read and extend, or None for a cache-free call.
        """
        out = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     past_key_values=past_key_values, use_cache=past_key_values is not None)
        return out.last_hidden_state

    def read_frames(
        self, queries: Tensor, cache: PatchCache, return_attention: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Query pass + connector: queries [n * k, Dq] (frame-major, k in use per frame) on the n cached frames
        -> tokens [n * k, Dl] (+ attention, per DINO layer [n, h, k, N])."""
        # contiguous: the same memory layout whatever the queries' strides, so equal inputs give equal tokens
        per_frame = queries.reshape(cache.num_frames, self.active_queries, queries.shape[-1]).contiguous()  # [n, k, Dq]
        z, attention = self.encoder.query_attend(per_frame, cache, return_attention)  # [n, k, D]
        return self.connector(z.flatten(0, 1)), attention

    def static_tokens(self, cache: PatchCache, return_attention: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """The coarse tokens [F * k, Dl]: every cached frame read with the static queries (+ attention)."""
        static = self.static_queries.expand(cache.num_frames, -1, -1).flatten(0, 1)  # [F*k, Dq]
        return self.read_frames(static, cache, return_attention)

    def visual_hidden(self, tokens: Tensor, num_frames: Tensor, text: TextInput | None = None) -> Tensor:
        """LLM over each sample's visual tokens (after its question, with ``text``'s ``visual_at``) -> hidden
        states at the visual positions [F * k, Dl].

        Causal attention makes these equal to the hidden states with the rest of the text appended, so it is left
        out. Text-only samples are left out of the batch (they would be empty rows).

        Args:
            tokens: [F * k, Dl] visual tokens, frame order.
            num_frames: long [B].
            text: (input_ids [B, S], attention_mask [B, S], visual_at [B]) when the question comes first.
        """
        has_frames = num_frames > 0
        counts = num_frames[has_frames] * self.active_queries
        if text is None or text[2] is None:
            layout = build_layout(counts, counts.new_zeros(len(counts), 0), pack_tokens=self.pack_tokens)
            embedded = tokens.new_zeros(len(counts), 0, tokens.shape[-1])
        else:
            input_ids, attention_mask, visual_at = (t[has_frames] for t in text)
            head_ids, head_mask, _, _ = split_text(input_ids, attention_mask, visual_at)
            layout = build_layout(counts, head_mask, visual_at, self.pack_tokens)
            embedded = self.embed_text(head_ids)
        embeds = assemble(layout, tokens, embedded.to(self.llm.get_input_embeddings().weight.dtype))
        hidden = self.llm_hidden(embeds, layout.attention_mask, layout.position_ids)  # [R, L, Dl]
        return hidden.reshape(-1, hidden.shape[-1])[layout.visual_index]  # [F*k, Dl]

    def visual_tokens(
        self,
        cache: PatchCache,
        num_frames: Tensor,
        mode: str = "coarse_fine",
        return_attention: bool = False,
        text: TextInput | None = None,
    ) -> VisualTokens:
        """Visual token embeddings for ``coarse_only`` or ``coarse_fine`` (the part shared by every text).

        Args:
            cache: patch pass of the batch's F frames.
            num_frames: long [B].
            mode: "coarse_only" or "coarse_fine".
            return_attention: keep the query attention weights.
            text: (input_ids, attention_mask, visual_at) when the question comes first (the fine queries are
                written after it).
        """
        if mode not in ("coarse_only", "coarse_fine"):
            raise ValueError(f"visual_tokens handles coarse_only / coarse_fine, not {mode!r}")
        coarse, coarse_attn = self.static_tokens(cache, return_attention)  # [F*k, Dl]
        if mode == "coarse_only":
            return VisualTokens(coarse, None, coarse_attn, None)
        if cache.num_frames == 0:  # text-only batch: nothing to refine
            return VisualTokens(coarse, coarse, coarse_attn, coarse_attn)
        queries = self.query_head(self.visual_hidden(coarse, num_frames, text))  # [F*k, Dq]
        fine, fine_attn = self.read_frames(
            shift_queries(queries, num_frames, self.initial_queries), cache, return_attention
        )
        return VisualTokens(coarse, fine, coarse_attn, fine_attn)

    def text_hidden(
        self,
        tokens: Tensor,
        num_frames: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        visual_at: Tensor | None = None,
    ) -> Tensor:
        """LLM over each sample's visual tokens and text -> the hidden states that predict each text position's
        next text token [B, S, Dl] (at the text position itself; for the last text token before the visual
        tokens, at the last visual token).

        Args:
            tokens: visual token embeddings [F * k, Dl], frame order.
            num_frames: long [B].
            input_ids: long [B, S], right-padded.
            attention_mask: [B, S], 1 on real text tokens.
            visual_at: long [B], text tokens before the visual ones (None: visual tokens first).
        """
        visual = num_frames * self.active_queries
        layout = build_layout(visual, attention_mask, visual_at, self.pack_tokens)
        embeds = assemble(layout, tokens, self.embed_text(input_ids))  # [R, L, Dl]
        hidden = self.llm_hidden(embeds, layout.attention_mask, layout.position_ids)  # [R, L, Dl]
        return gather_text(layout, hidden, predicting_index(layout, visual, visual_at))

    def text_logits(self, hidden: Tensor, logits_mask: Tensor | None) -> Tensor:
        """lm_head on the selected text rows only: [N, V] (or [B, S, V] without a mask)."""
        return self.lm_head(select_rows(hidden, logits_mask))

    # ------------------------------------------------------------------------------------------ autoregressive

    def autoregressive_prefix(
        self,
        cache: PatchCache,
        num_frames: Tensor,
        return_attention: bool = False,
        head: tuple[Tensor, Tensor] | None = None,
    ) -> ARPrefix:
        """True inference over the frames: each frame is read with the queries the LLM wrote after the previous one.

        Step t feeds k slots per sample (frame t's k tokens, positions t * k ... t * k + k - 1) to the cached LLM;
        the hidden state at slot j writes query j of frame t + 1. Samples with t < T_i advance (their frame t);
        the others get zero slots that only that step's own positions see (so no row is ever fully masked) and
        that every later token ignores. Each step costs the same whatever t is: nothing cached is recomputed.

        Args:
            cache: patch pass of the batch's F frames.
            num_frames: long [B].
            return_attention: keep the query attention weights.
            head: (ids [B, P], mask [B, P]) right-padded text that goes into the cache before the frames (the
                question of a question-first layout); the frames' positions follow each sample's own head.
        """
        decoder_llm = self.llm.get_decoder()
        if self.llm.is_activation_checkpointing and self.llm.training:
            raise ValueError(
                "autoregressive mode needs the LLM KV cache: call eval() or disable LLM checkpointing"
            )
        batch, device, k = len(num_frames), num_frames.device, self.active_queries
        starts, t_max = frame_starts(num_frames), int(num_frames.max()) if batch else 0
        kv = DynamicCache(config=decoder_llm.config)
        history, head_hidden = self._head_on_cache(kv, head, batch, device)  # [B, P], [B, P, Dl] | None
        offsets = history.sum(1)  # [B] positions taken by each sample's head
        last_visual = None
        queries = self.initial_queries.expand(batch, -1, -1)  # [B, k, Dq]
        slots = torch.arange(k, device=device)
        frame_ids, token_steps, attn_steps = [], [], []
        for t in range(t_max):
            active = num_frames > t  # [B]
            rows = active.nonzero().squeeze(1)  # [n]
            frames_t = starts[rows] + t  # [n]
            tokens, attention = self.read_frames(
                queries[rows].flatten(0, 1), cache.select(frames_t), return_attention
            )  # [n*k, Dl]
            slot = self._slot_embeddings(tokens.view(len(rows), k, -1), rows, batch)  # [B, k, Dl]
            step_mask = torch.cat([history, history.new_ones(batch, k)], 1)  # [B, (t+1)*k]
            positions = offsets[:, None] + t * k + slots  # [B, k]
            hidden = self.llm_hidden(slot, step_mask, positions, kv)  # [B, k, Dl]
            last_visual = hidden[:, -1] if last_visual is None else torch.where(
                active[:, None], hidden[:, -1], last_visual)  # [B, Dl]
            history = torch.cat([history, active.long()[:, None].expand(batch, k)], 1)
            queries = torch.where(
                active[:, None, None], self.query_head(hidden).to(queries.dtype), queries
            )  # [B, k, Dq]
            frame_ids.append(frames_t)
            token_steps.append(tokens)
            attn_steps.append(attention)
        if head_hidden is not None and last_visual is not None:
            hands_over = (num_frames > 0) & (offsets > 0)
            rows = hands_over.nonzero().squeeze(1)
            head_hidden = head_hidden.clone()
            head_hidden[rows, offsets[rows] - 1] = last_visual[rows].to(head_hidden.dtype)
        if not frame_ids:  # no frame in the whole batch: an empty prefix
            return ARPrefix(
                kv, history, num_frames.clone(), cache.features.new_zeros(0, self.dino_to_llm.out_features),
                head_hidden=head_hidden,
            )
        order = torch.cat(frame_ids)  # frame index of every step-major frame
        token_order = (order[:, None] * k + slots).flatten()  # token index of every step-major token
        attention = None
        if return_attention:
            attention = [frame_order([s[i] for s in attn_steps], order) for i in range(len(attn_steps[0]))]
        return ARPrefix(
            kv, history, num_frames.clone(), frame_order(token_steps, token_order), attention, head_hidden
        )

    def _head_on_cache(
        self, kv: Cache, head: tuple[Tensor, Tensor] | None, batch: int, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """Text before the frames into an empty cache -> (its key mask [B, P], its hidden states or None)."""
        if head is None or not head[0].shape[1]:
            return torch.zeros(batch, 0, dtype=torch.long, device=device), None
        # Every head position is visible in its own call (padding is on the right, so no real token sees a padded
        # one); the padded positions are masked for everything after.
        width = head[0].shape[1]
        positions = torch.arange(width, device=device).expand(batch, width)
        hidden = self.llm_hidden(self.embed_text(head[0]), torch.ones_like(head[1]), positions, kv)
        return head[1].long(), hidden

    def _slot_embeddings(self, tokens: Tensor, rows: Tensor, batch: int) -> Tensor:
        """One step's LLM input: the active samples' tokens [n, k, Dl] at their rows, zeros elsewhere -> [B, k, Dl]."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        slot = tokens.new_zeros(batch, *tokens.shape[1:], dtype=dtype)
        return slot.index_copy(0, rows, tokens.to(dtype))

    def continue_text(self, prefix: ARPrefix, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Append right-padded text [B, S] to an autoregressive prefix -> hidden states [B, S, Dl].

        Sample b's j-th real token gets position ``prefix.next_positions[b] + j`` (right after its own visual slots
        or previous text); the prefix is advanced, so the next chunk continues after this one. A sample's next
        token after a padded chunk is predicted from the hidden state of its last real token.
        """
        positions = prefix.next_positions[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = torch.cat([prefix.attention_mask, attention_mask.long()], 1)  # [B, cache + S]
        hidden = self.llm_hidden(self.embed_text(input_ids), mask, positions, prefix.past_key_values)
        prefix.advance(attention_mask)
        return hidden

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        frames: Tensor,
        num_frames: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        mode: str = "coarse_fine",
        logits_mask: Tensor | None = None,
        return_coarse_logits: bool = False,
        return_autoregressive_logits: bool = False,
        visual_at: Tensor | None = None,
        return_fine_attention: bool = False,
        return_autoregressive_attention: bool = False,
    ) -> VLMOutput:
        """Logits over text positions for a batch.

        Args:
            frames: [F, 3, H, W], all real frames of the batch in sample order.
            num_frames: long [B], frames per sample (0: text-only).
            input_ids: long [B, S], right-padded.
            attention_mask: [B, S], 1 on real text tokens.
            mode: "coarse_fine", "coarse_only" or "autoregressive".
            logits_mask: bool [B, S]; lm_head only on these rows (those whose label is scored).
            return_coarse_logits: also return logits of a pass over [coarse tokens ; text] (same rows).
            return_autoregressive_logits: also return the logits of the autoregressive mode (same rows; the
                frame-by-frame visual pass reuses this batch's patch pass).
            visual_at: long [B], text tokens placed before each sample's visual tokens (a question-first layout:
                ``fovlm.data.roles.question_end``); None: visual tokens first.
            return_fine_attention: (coarse_fine) also return the written queries' attention, in the graph.
            return_autoregressive_attention: also return that of the autoregressive pass's queries, if it runs.

        Returns:
            VLMOutput with logits [N, V] (N = logits_mask.sum(), row order = logits_mask.nonzero()) or [B, S, V].
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        check_batch(frames, num_frames, input_ids, attention_mask, logits_mask)
        cache = self.encode_patches(frames)
        text = (input_ids, attention_mask, visual_at)
        ar_attention = None
        if mode == "autoregressive":
            hidden, ar_attention = autoregressive_text(self, cache, num_frames, text, return_autoregressive_attention)
            visual = self.visual_tokens(cache, num_frames, "coarse_only") if return_coarse_logits else None
        else:
            visual = self.visual_tokens(cache, num_frames, mode, return_fine_attention, text)
            hidden = self.text_hidden(visual.tokens, num_frames, *text)
        logits = self.text_logits(hidden, logits_mask)
        coarse_logits = autoregressive_logits = None
        if return_coarse_logits:
            if mode == "coarse_only":
                coarse_logits = logits
            else:
                coarse_hidden = self.text_hidden(visual.coarse, num_frames, *text)
                coarse_logits = self.text_logits(coarse_hidden, logits_mask)
        if return_autoregressive_logits:
            if mode == "autoregressive":
                autoregressive_logits = logits
            else:
                ar_hidden, ar_attention = autoregressive_text(
                    self, cache, num_frames, text, return_autoregressive_attention)
                autoregressive_logits = self.text_logits(ar_hidden, logits_mask)
        fine_attention = visual.fine_attention if return_fine_attention and mode == "coarse_fine" else None
        return VLMOutput(logits, coarse_logits, autoregressive_logits, fine_attention, ar_attention)

    def forward_pair(
        self,
        frames: Tensor,
        num_frames: Tensor,
        chosen: tuple[Tensor, Tensor, Tensor | None],
        rejected: tuple[Tensor, Tensor, Tensor | None],
        mode: str = "coarse_fine",
        visual_at: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """DPO forward: the visual part once, chosen and rejected texts as one stacked LLM batch.

        Args:
            frames, num_frames: as in ``forward``.
            chosen: (input_ids [B, Sc], attention_mask [B, Sc], logits_mask [B, Sc] or None).
            rejected: (input_ids [B, Sr], attention_mask [B, Sr], logits_mask [B, Sr] or None).
            mode: "coarse_fine" or "coarse_only".
            visual_at: long [B], text tokens before the visual ones, the same on both sides (the shared question).

        Returns:
            (chosen logits, rejected logits), each selected by its own logits_mask as in ``forward``.
        """
        if mode not in ("coarse_only", "coarse_fine"):
            raise ValueError(f"forward_pair supports coarse_only / coarse_fine, not {mode!r}")
        for name, (ids, mask, lmask) in (("chosen", chosen), ("rejected", rejected)):
            try:
                check_batch(frames, num_frames, ids, mask, lmask)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
        text = (chosen[0], chosen[1], visual_at)
        tokens = self.visual_tokens(self.encode_patches(frames), num_frames, mode, text=text).tokens  # [F*k, Dl]
        width = max(chosen[0].shape[1], rejected[0].shape[1])
        ids = torch.cat([pad_right(chosen[0], width), pad_right(rejected[0], width)])  # [2B, S]
        mask = torch.cat([pad_right(chosen[1], width), pad_right(rejected[1], width)])  # [2B, S]
        both_at = None if visual_at is None else torch.cat([visual_at, visual_at])
        hidden = self.text_hidden(torch.cat([tokens, tokens]), torch.cat([num_frames, num_frames]), ids, mask, both_at)
        batch = len(num_frames)
        chosen_hidden = hidden[:batch, : chosen[0].shape[1]]  # [B, Sc, Dl]
        rejected_hidden = hidden[batch:, : rejected[0].shape[1]]  # [B, Sr, Dl]
        return self.text_logits(chosen_hidden, chosen[2]), self.text_logits(rejected_hidden, rejected[2])
