"""Turns a StepPlan into one batched forward of the base model and returns logits.

All of a step's tokens are flattened into one row (`[1, tokens]`, decode tokens
first, then prefill chunks) with per-token absolute `position_ids`
(step_layout.py plans it). Before the forward the runner writes the step's
integer metadata into its persistent buffers (step_buffers.py: one host fill,
one non-blocking copy) and builds the step's one StepContext: the attention
metadata (which KV row and position each token belongs to) and the
AdapterBatch (which adapter slot each token uses, planned once for every
layer). Only the rows that sample (decode tokens and prompt ends) go through
the LM head, under a context whose AdapterBatch covers just those rows.

On CUDA a base-only decode step can instead replay a captured CUDA graph of
the same forward (`RunnerOptions.cuda_graphs`, decode_graphs.py): its shapes
depend only on the batch bucket and the key-length bucket.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.step import StepContext, use_step
from server.engine.attention import AttentionMetadata, PrefillSpan, StepInterrupted, check_interrupt, register
from server.engine.attention_math import span_mask
from server.engine.decode_graphs import DecodeGraphs
from server.engine.kv_cache import KVCache
from server.engine.scheduler import StepPlan
from server.engine.step_buffers import StepBuffers, decode_buckets
from server.engine.step_layout import StepLayout
from server.model.families import check_model
from server.model.load import BaseModel

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class RunnerOptions:
    """How steps run on the device. The defaults suit every device; CUDA-only options refuse a CPU."""

    static_decode: bool | None = None  # graph-ready decode shapes (step_layout.py); None = on CUDA only
    buckets: tuple[int, ...] | None = None  # static decode batch buckets (capped at max_batch); None = default
    cuda_graphs: bool = False  # replay base-only decode steps from captured CUDA graphs
    sdpa_backends: tuple[str, ...] | None = None  # CUDA: the SDPA backends allowed; None = torch's choice


class Runner:
    def __init__(self, base: BaseModel, cache: KVCache, options: RunnerOptions | None = None) -> None:
        options = options or RunnerOptions()
        self.base = base
        self.model = base.model
        self.cache = cache
        self.device = base.device
        check_model(base.model.config, base.max_context)  # a model built elsewhere than load_base is checked too
        base.model.config._attn_implementation = register()
        # Decoder stack and LM head are called separately: the head runs only on
        # the rows that sample, under a mapping of exactly those rows.
        self.decoder = base.model.get_decoder()
        cuda = self.device.type == "cuda"
        self.static = cuda if options.static_decode is None else options.static_decode
        # A decode step never pads past max_batch rows (the cache's rows and the masks' size).
        self.buckets = tuple(sorted({min(b, cache.max_batch) for b in options.buckets})) if options.buckets \
            else decode_buckets(cache.max_batch)
        self.graphs = DecodeGraphs(self.device) if options.cuda_graphs else None
        self._sdpa = _sdpa_backends(options.sdpa_backends, self.device)
        self.buffers = StepBuffers(self.device)
        self._arange = torch.arange(cache.max_seq_len, device=self.device)  # [max_seq_len] key positions
        # Static decode: key length → [rows, keys] additive mask (0 / -inf) in the model's dtype, filled in
        # place each step. Additive, so SDPA uses it as it is (a bool mask is converted in every layer).
        self._masks: dict[int, torch.Tensor] = {}
        # Handed to the decoder as its attention mask: transformers takes a 4D mask as already prepared, so it
        # builds none and skips its packed-sequence check (a device→host read every step). engine_attention
        # ignores it: the step's metadata encodes what each token sees.
        self._prepared = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._zero = torch.zeros((), dtype=base.dtype, device=self.device)
        self._neg_inf = torch.full((), float("-inf"), dtype=base.dtype, device=self.device)

    @property
    def head(self) -> torch.nn.Module:
        """Looked up per step: adapter layers are injected after the engine is built (lm_head is wrapped)."""
        return self.model.get_output_embeddings()

    def forward(self, plan: StepPlan, interrupt: threading.Event | None = None) -> torch.Tensor:
        """Run the step; logits [sampling rows, vocab] float32 in `plan.sampling()` order. `interrupt`: once
        set, the step stops at its next layer with StepInterrupted (a CUDA graph replay always completes)."""
        layout = StepLayout.build(plan, self.cache, self.static, self.buckets)
        # Before any write: positions past the zeroed prefix were never written (see KVCache).
        self.cache.ensure_initialized(*layout.zero_rows())
        ids, positions, rows, keep, index, lengths = self.buffers.load(
            layout.ids, layout.positions, layout.rows, layout.keep, layout.decode_index, layout.lengths)
        # A base-only step on the shared lane has no adapter plan at all (the modules run as they are):
        # no slot tensors built and copied for it.
        plain = plan.lane is None and layout.base_only
        graphed = self.graphs is not None and layout.static and not layout.prefills and plain
        attention = self._attention(layout, positions, rows, index, lengths, None if graphed else interrupt)
        step = StepContext(adapters=None if plain else self._adapters(layout.slots, plan.lane), attention=attention)
        # The LM head sees only the sampling rows, so it gets their own batch
        # (an adapter on lm_head must line up with the rows it is given).
        head_step: StepContext[AttentionMetadata] = StepContext(
            adapters=None if plain else self._adapters([layout.slots[i] for i in layout.keep], plan.lane))

        def run() -> torch.Tensor:
            if layout.static and layout.num_decode:
                self._fill_mask(layout, lengths)
            return self._forward(ids, positions, None if layout.keep_identity else keep, step, head_step)

        if graphed:
            logits = self.graphs.run((layout.num_decode, layout.decode_len), self.buffers.generation, run)
        else:
            try:
                logits = run()
            except StepInterrupted:
                if self.device.type == "cuda":  # the next step refills the host buffers the queued copies read
                    torch.cuda.synchronize(self.device)
                raise
        return logits[:layout.num_sampling]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None,
                 step: StepContext[AttentionMetadata], head_step: StepContext[AttentionMetadata]) -> torch.Tensor:
        """The forward proper: what a CUDA graph captures. [sampling rows, vocab] float32."""
        with torch.inference_mode(), self._sdpa:
            with use_step(step):
                hidden = self.decoder(input_ids=ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                                      attention_mask=self._prepared, use_cache=False).last_hidden_state
                # hidden: [1, tokens, hidden]
            if step.attention is not None:
                check_interrupt(step.attention)  # the head is a large share of a small model's step
            with use_step(head_step):
                rows = hidden[0] if keep is None else hidden[0].index_select(0, keep)  # [sampling rows, hidden]
                logits = self.head(rows)  # [sampling rows, vocab]
            return self._postprocess(logits.float())

    def _adapters(self, slots: list[int], lane: int | None) -> AdapterBatch:
        return AdapterBatch.build(AdapterMapping.from_token_slots(slots, self.device, lane=lane))

    def _postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's own forward does after its LM head (e.g. Gemma-2 soft-capping)."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _attention(self, layout: StepLayout, positions: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
                   lengths: torch.Tensor, interrupt: threading.Event | None) -> AttentionMetadata:
        d = layout.num_decode
        decode_rows: torch.Tensor | slice | None = None
        decode_mask = None
        if d:
            decode_rows = layout.decode_slice if layout.decode_slice is not None else rows[:d]
            if layout.static:
                decode_mask = self._mask(layout.decode_len)[:d].view(d, 1, 1, layout.decode_len)
            elif layout.decode_mask_needed:
                decode_mask = (self._arange[:layout.decode_len].unsqueeze(0) < lengths.unsqueeze(1)).view(
                    len(layout.lengths), 1, 1, layout.decode_len)
        spans = tuple(PrefillSpan(p.row, p.start, p.length, p.position, self._chunk_mask(p.position, p.length))
                      for p in layout.prefills)
        # Static decode: the window's first key is 0 whatever the lengths (min_len 0), a fixed shape.
        min_len = 0 if layout.static or not d else min(layout.lengths)
        return AttentionMetadata(self.cache, rows, positions, d, decode_rows,
                                 index if layout.decode_index else None, decode_mask, layout.decode_len, spans,
                                 lengths if d else None, min_len, fold_groups=layout.static, interrupt=interrupt)

    def _mask(self, keys: int) -> torch.Tensor:
        """The persistent `[rows, keys]` decode mask of one key-length bucket (filled in place each step)."""
        mask = self._masks.get(keys)
        if mask is None:
            mask = torch.zeros(self.cache.max_batch + 1, keys, dtype=self.base.dtype, device=self.device)
            self._masks[keys] = mask
        return mask

    def _fill_mask(self, layout: StepLayout, lengths: torch.Tensor) -> None:
        """0 where key position < the row's length, -inf past it, written into the persistent mask."""
        d, keys = layout.num_decode, layout.decode_len
        seen = self._arange[:keys].unsqueeze(0) < lengths[:d].unsqueeze(1)  # [d, keys]
        torch.where(seen, self._zero, self._neg_inf, out=self._mask(keys)[:d])

    def _chunk_mask(self, position: int, n: int) -> torch.Tensor | None:
        """[n, position + n] bool: query j (at position + j) sees keys 0..position + j (None at position 0)."""
        return None if position == 0 else span_mask(position, n, 0, None, self.device)


def _sdpa_backends(names: tuple[str, ...] | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backends a CUDA step may use (sdpa_kernel), or no restriction."""
    if names is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"sdpa_backends {names} applies to CUDA only; this model runs on {device.type}")
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise ValueError(f"sdpa_backends: unknown {unknown}; choose from {sorted(SDPA_BACKENDS)}")
    return _Reusable(lambda: sdpa_kernel([SDPA_BACKENDS[n] for n in names]))


class _Reusable(contextlib.AbstractContextManager):
    """A context manager made fresh on every `with` (sdpa_kernel's is single-use)."""

    def __init__(self, make) -> None:
        self._make = make
        self._stack: list[contextlib.AbstractContextManager] = []

    def __enter__(self):
        cm = self._make()
        self._stack.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)
