"""Attention over the engine's KV cache, plugged into transformers without forking it.

`register()` installs `engine_attention` under ATTN_IMPL in transformers'
AttentionInterface (and a mask function under the same name that returns None
while an engine step runs). Every decoder layer then calls `engine_attention`
with q/k/v after rotary embedding; it writes k/v into the cache rows/positions
of the current `AttentionContext` and attends over each sequence's cached keys.

A step's tokens arrive flattened into one row (`[1, heads, tokens, head_dim]`):
first `num_decode` single-token decode rows, then prefill chunks. Decode rows
are attended in one batched SDPA over the cache; each prefill chunk attends
over its own row's cache (a short loop over the few sequences prefilling).

Without a context (e.g. the trainer's ordinary forward with gradients) both
functions defer to transformers' SDPA path, padding masks included.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.kv_cache import KVCache

ATTN_IMPL = "loraplex_engine"


@dataclass(frozen=True)
class PrefillSpan:
    row: int  # KV-cache row
    start: int  # first index of this chunk in the step's flattened tokens
    length: int  # tokens in this chunk
    position: int  # absolute position of the chunk's first token
    mask: torch.Tensor | None  # [length, position + length] bool; None = plain causal (position 0)


@dataclass(frozen=True)
class AttentionContext:
    cache: KVCache
    token_rows: torch.Tensor  # [tokens] long: cache row of each token
    token_pos: torch.Tensor  # [tokens] long: absolute position of each token
    num_decode: int  # tokens [0, num_decode) are one-token decode rows
    decode_rows: torch.Tensor | slice | None  # [num_decode] rows, or a contiguous slice of rows
    # With a slice that also covers rows not decoding this step (finished or prefilling
    # batch-mates): where each decode token's row sits in the slice. [num_decode] long
    decode_index: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [decode rows or slice rows, 1, 1, decode_len] bool: key position < length
    decode_len: int  # keys each decode row attends over (longest decode length this step)
    prefills: tuple[PrefillSpan, ...]


_state = threading.local()


def current_context() -> AttentionContext | None:
    return getattr(_state, "context", None)


@contextlib.contextmanager
def use_context(context: AttentionContext | None) -> Iterator[None]:
    previous = current_context()
    _state.context = context
    try:
        yield
    finally:
        _state.context = previous


def engine_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    ctx = current_context()
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer = module.layer_idx
    k_cache, v_cache = ctx.cache.k[layer], ctx.cache.v[layer]  # [rows, kv_heads, seq, head_dim]
    # query: [1, heads, tokens, head_dim]; key/value: [1, kv_heads, tokens, head_dim]
    k_cache[ctx.token_rows, :, ctx.token_pos] = key[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    v_cache[ctx.token_rows, :, ctx.token_pos] = value[0].transpose(0, 1)
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    out = query.new_empty(tokens, heads, head_dim)  # [tokens, heads, head_dim]
    if ctx.num_decode:
        out[:ctx.num_decode] = _decode(ctx, query, k_cache, v_cache, scaling)
    for span in ctx.prefills:
        out[span.start:span.start + span.length] = _prefill(span, query, k_cache, v_cache, scaling)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim]


def _decode(ctx: AttentionContext, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            scaling: float | None) -> torch.Tensor:
    """One batched SDPA for every decode token, over a view of the cache rows when possible.

    Why a slice with holes: indexing the cache with a row tensor copies every
    row's keys and values (per layer, per step: ~7 % of a 32-sequence step), and
    rows stop being contiguous as soon as one request finishes before its
    batch-mates. Attending over the whole slice instead costs the holes'
    attention (zero queries, outputs dropped; rows are independent in SDPA, so
    whatever a hole's cache row holds cannot reach the others).
    """
    d, length = ctx.num_decode, ctx.decode_len
    q = query[0, :, :d].transpose(0, 1).unsqueeze(2)  # [d, heads, 1, head_dim]
    if ctx.decode_index is not None:
        assert isinstance(ctx.decode_rows, slice)
        span = ctx.decode_rows.stop - ctx.decode_rows.start
        q = q.new_zeros(span, *q.shape[1:]).index_copy_(0, ctx.decode_index, q)  # [span, heads, 1, head_dim]
    k = k_cache[ctx.decode_rows, :, :length]  # [d or span, kv_heads, length, head_dim]
    v = v_cache[ctx.decode_rows, :, :length]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.decode_mask, scale=scaling, enable_gqa=True)
    if ctx.decode_index is not None:
        o = o.index_select(0, ctx.decode_index)  # [d, heads, 1, head_dim]
    return o.squeeze(2)  # [d, heads, head_dim]


def _prefill(span: PrefillSpan, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             scaling: float | None) -> torch.Tensor:
    end = span.position + span.length
    q = query[:, :, span.start:span.start + span.length]  # [1, heads, n, head_dim]
    k = k_cache[span.row:span.row + 1, :, :end]  # [1, kv_heads, end, head_dim]
    v = v_cache[span.row:span.row + 1, :, :end]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, is_causal=span.mask is None,
                                       scale=scaling, enable_gqa=True)
    return o[0].transpose(0, 1)  # [n, heads, head_dim]


def engine_mask(*args, **kwargs) -> torch.Tensor | None:
    """No mask during an engine step (the context encodes it); SDPA's mask otherwise."""
    if current_context() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> str:
    """Install the engine attention under ATTN_IMPL (idempotent); returns the name."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPL, engine_attention)
        AttentionMaskInterface.register(ATTN_IMPL, engine_mask)
        _registered = True
    return ATTN_IMPL
