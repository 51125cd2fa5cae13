"""Turns a StepPlan into one batched forward of the base model and returns logits.

All of a step's tokens are flattened into one row (`[1, tokens]`, decode tokens
first, then prefill chunks) with per-token absolute `position_ids`. Before the
forward the runner builds the step's one StepContext: the attention metadata
(which KV row and position each token belongs to) and the AdapterBatch (which
adapter slot each token uses, planned once for every layer). Only the rows that
sample (decode tokens and prompt ends) go through the LM head, under a context
whose AdapterBatch covers just those rows.
"""

from __future__ import annotations

import torch

from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.step import StepContext, use_step
from server.engine.attention import AttentionMetadata, PrefillSpan, register
from server.engine.attention_math import span_mask
from server.engine.kv_cache import KVCache
from server.engine.scheduler import StepPlan
from server.model.families import check_model
from server.model.load import BaseModel

# Decode attends over a slice of cache rows (holes included) while it spans at most this
# many rows per decoding sequence; past that, copying the rows out is cheaper.
MAX_SPAN_PER_ROW = 2


class Runner:
    def __init__(self, base: BaseModel, cache: KVCache) -> None:
        self.base = base
        self.model = base.model
        self.cache = cache
        self.device = base.device
        check_model(base.model.config, base.max_context)  # a model built elsewhere than load_base is checked too
        base.model.config._attn_implementation = register()
        # Decoder stack and LM head are called separately: the head runs only on
        # the rows that sample, under a mapping of exactly those rows.
        self.decoder = base.model.get_decoder()

    @property
    def head(self) -> torch.nn.Module:
        """Looked up per step: adapter layers are injected after the engine is built (lm_head is wrapped)."""
        return self.model.get_output_embeddings()

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Run the step; logits [sampling rows, vocab] float32 in `plan.sampling()` order."""
        ids, positions, rows, slots, keep = self._flatten(plan)
        dev = self.device
        # Before any write: positions past the zeroed prefix were never written (see KVCache).
        self.cache.ensure_initialized({s.row for s in plan.decode} | {s.row for s, _ in plan.prefill},
                                      max(positions) + 1)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [tokens]
        attention = self._attention(plan, pos_t, torch.tensor(rows, dtype=torch.long, device=dev))
        step = StepContext(adapters=self._adapters(slots, plan.lane), attention=attention)
        # The LM head sees only the sampling rows, so it gets their own batch
        # (an adapter on lm_head must line up with the rows it is given).
        head_step: StepContext[AttentionMetadata] = StepContext(adapters=self._adapters([slots[i] for i in keep],
                                                                                        plan.lane))
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev).unsqueeze(0)  # [1, tokens]
        keep_t = torch.tensor(keep, dtype=torch.long, device=dev)  # [sampling rows]
        with torch.inference_mode():
            with use_step(step):
                hidden = self.decoder(input_ids=input_ids, position_ids=pos_t.unsqueeze(0),
                                      use_cache=False).last_hidden_state  # [1, tokens, hidden]
            with use_step(head_step):
                logits = self.head(hidden[0].index_select(0, keep_t))  # [sampling rows, vocab]
        return self._postprocess(logits.float())

    def _adapters(self, slots: list[int], lane: int | None) -> AdapterBatch:
        return AdapterBatch.build(AdapterMapping.from_token_slots(slots, self.device, lane=lane))

    def _postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's own forward does after its LM head (e.g. Gemma-2 soft-capping)."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @staticmethod
    def _flatten(plan: StepPlan) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        for s in plan.decode:
            ids.append(s.last_token)
            positions.append(s.position)
            rows.append(s.row)
            slots.append(s.slot)
        keep = list(range(len(plan.decode)))
        for s, n in plan.prefill:
            ids.extend(s.request.prompt_ids[s.prefilled:s.prefilled + n])
            positions.extend(range(s.prefilled, s.prefilled + n))
            rows.extend([s.row] * n)
            slots.extend([s.slot] * n)
            if s.prefilled + n == s.prompt_len:
                keep.append(len(ids) - 1)
        return ids, positions, rows, slots, keep

    def _attention(self, plan: StepPlan, positions: torch.Tensor, rows: torch.Tensor) -> AttentionMetadata:
        d = len(plan.decode)
        decode_rows: torch.Tensor | slice | None = None
        decode_index = decode_mask = None
        decode_len = 0
        decode_lengths = None
        if d:
            lengths = [s.position + 1 for s in plan.decode]
            decode_len = max(lengths)
            row_ids = [s.row for s in plan.decode]
            lo, hi = min(row_ids), max(row_ids)
            if row_ids == list(range(lo, lo + d)):
                decode_rows = slice(lo, lo + d)
            elif hi - lo + 1 <= MAX_SPAN_PER_ROW * d:
                decode_rows = slice(lo, hi + 1)  # holes attend too, cheaper than copying rows out
                decode_index = torch.tensor([r - lo for r in row_ids], dtype=torch.long, device=self.device)
                by_row = [decode_len] * (hi - lo + 1)  # a hole is unmasked (its output is dropped)
                for r, n in zip(row_ids, lengths):
                    by_row[r - lo] = n
                lengths = by_row
            else:
                decode_rows = rows[:d]
            decode_lengths = torch.tensor(lengths, device=self.device)  # [d or span]
            if min(lengths) < decode_len:
                arange = torch.arange(decode_len, device=self.device)
                decode_mask = (arange.unsqueeze(0) < decode_lengths.unsqueeze(1)).view(len(lengths), 1, 1, decode_len)
        spans = []
        start = d
        for s, n in plan.prefill:
            spans.append(PrefillSpan(s.row, start, n, s.prefilled, self._chunk_mask(s.prefilled, n)))
            start += n
        return AttentionMetadata(self.cache, rows, positions, d, decode_rows, decode_index, decode_mask, decode_len,
                                tuple(spans), decode_lengths, min(lengths) if d else 0)

    def _chunk_mask(self, position: int, n: int) -> torch.Tensor | None:
        """[n, position + n] bool: query j (at position + j) sees keys 0..position + j (None at position 0)."""
        return None if position == 0 else span_mask(position, n, 0, None, self.device)
