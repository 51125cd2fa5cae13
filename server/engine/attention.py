"""Attention over the engine's KV cache, plugged into transformers without forking it.

`register()` installs `engine_attention` under ATTN_IMPL in transformers'
AttentionInterface (and a mask function under the same name that returns None
while an engine step runs). Every decoder layer then calls `engine_attention`
with q/k/v after rotary embedding; it writes k/v into the cache rows/positions
of the step's `AttentionMetadata` (the StepContext's `.attention`) and attends
over each sequence's cached keys.

A step's tokens arrive flattened into one row (`[1, heads, tokens, head_dim]`):
first `num_decode` single-token decode rows, then prefill chunks. Decode rows
are attended in one batched SDPA over the cache; each prefill chunk attends
over its own row's cache (a short loop over the few sequences prefilling).

Sliding-window layers (the modeling code passes `sliding_window`) attend over
the keys in each query's window only; soft-capped layers (`softcap`) take a
float32 matmul path (attention_math.py). Any other keyword the modeling code
passes with a value is refused, never dropped.

Without attention metadata (e.g. the trainer's ordinary forward with gradients) both
functions defer to transformers' SDPA path, padding and window masks included
(soft-capped layers: the matmul path under the same mask).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.adapters.runtime.step import current_step
from server.engine.attention_math import attend, capped_attention, decode_window_mask, span_mask
from server.engine.kv_cache import KVCache
from server.model.families import UnsupportedModel

ATTN_IMPL = "loraplex_engine"


@dataclass(frozen=True)
class PrefillSpan:
    row: int  # KV-cache row
    start: int  # first index of this chunk in the step's flattened tokens
    length: int  # tokens in this chunk
    position: int  # absolute position of the chunk's first token
    mask: torch.Tensor | None  # [length, position + length] bool; None = plain causal (position 0)


@dataclass(frozen=True)
class AttentionMetadata:
    cache: KVCache
    token_rows: torch.Tensor  # [tokens] long: cache row of each token
    token_pos: torch.Tensor  # [tokens] long: absolute position of each token
    num_decode: int  # tokens [0, num_decode) are one-token decode rows
    decode_rows: torch.Tensor | slice | None  # [num_decode] rows, or a contiguous slice of rows
    # With a slice that also covers rows not decoding this step (finished or prefilling
    # batch-mates): where each decode token's row sits in the slice. [num_decode] long
    decode_index: torch.Tensor | None
    # [decode rows or slice rows, 1, 1, decode_len]: key position < length, bool (eager layout) or additive
    # 0 / -inf in the model dtype (static layout: a persistent buffer, see runner.py)
    decode_mask: torch.Tensor | None
    decode_len: int  # keys each decode row attends over (longest decode length this step)
    prefills: tuple[PrefillSpan, ...]
    # [decode rows or slice rows] long: each attending row's length (a hole counts decode_len); None without decode
    decode_lengths: torch.Tensor | None = None
    decode_min_len: int = 0  # shortest of decode_lengths
    # Decode folds each kv head's query group into that head's query positions (static layout): SDPA then
    # needs no GQA support, which CUDA's memory-efficient kernel lacks under a mask (else: math fallback).
    fold_groups: bool = False
    # Sliding-window masks built this step, shared by every layer with the same window.
    window_masks: dict[tuple, tuple[int, torch.Tensor | None]] = field(default_factory=dict, compare=False)
    # Set by another thread to abandon this step at the next layer (see StepInterrupted); None: runs to the end.
    interrupt: threading.Event | None = field(default=None, compare=False)


class StepInterrupted(Exception):
    """The step was abandoned between layers, before its results were used: nothing it wrote is read
    before being written again (a row's KV past its length is never attended), so the engine may
    schedule afresh and run the same sequences later."""


def check_interrupt(ctx: AttentionMetadata) -> None:
    if ctx.interrupt is not None and ctx.interrupt.is_set():
        raise StepInterrupted


def current_attention() -> AttentionMetadata | None:
    """The running engine step's attention metadata; None outside one (an ordinary forward)."""
    step = current_step()
    return None if step is None else step.attention


# Keywords the modeling code passes that the engine has no use for: positions come from the
# metadata (engine step) or the mask (an ordinary forward), and the engine keeps its own cache.
_UNUSED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache"})


def engine_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, softcap: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    _check_kwargs(module, kwargs)
    ctx = current_attention()
    if ctx is None:
        return _ordinary_forward(module, query, key, value, attention_mask, scaling, dropout, sliding_window,
                                softcap, kwargs)
    if dropout:
        raise UnsupportedModel(f"{type(module).__name__} asks for attention dropout {dropout} while serving "
                               "(the model is in training mode?)")
    check_interrupt(ctx)
    layer = module.layer_idx
    k_cache, v_cache = ctx.cache.k[layer], ctx.cache.v[layer]  # [rows, kv_heads, seq, head_dim]
    # query: [1, heads, tokens, head_dim]; key/value: [1, kv_heads, tokens, head_dim]
    k_cache[ctx.token_rows, :, ctx.token_pos] = key[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    v_cache[ctx.token_rows, :, ctx.token_pos] = value[0].transpose(0, 1)
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    if not ctx.prefills:  # a decode-only step: its output is the whole output, no copy into place
        return _decode(ctx, query, k_cache, v_cache, scaling, sliding_window, softcap).unsqueeze(0), None
    out = query.new_empty(tokens, heads, head_dim)  # [tokens, heads, head_dim]
    if ctx.num_decode:
        out[:ctx.num_decode] = _decode(ctx, query, k_cache, v_cache, scaling, sliding_window, softcap)
    for i, span in enumerate(ctx.prefills):
        out[span.start:span.start + span.length] = _prefill(ctx, i, span, query, k_cache, v_cache, scaling,
                                                            sliding_window, softcap)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim]


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse any keyword the engine would otherwise drop: a silently ignored argument is wrong text."""
    for name, value in kwargs.items():
        if name in _UNUSED_KWARGS or value is None or value is False or (name == "is_causal" and value is True):
            continue
        raise UnsupportedModel(f"{type(module).__name__} passes `{name}={value!r}` to its attention, which "
                               "loraplex's engine attention does not implement")


def _ordinary_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None, dropout: float,
                     sliding_window: int | None, softcap: float | None, kwargs: dict) -> tuple[torch.Tensor, None]:
    """An ordinary forward (the trainer): transformers' SDPA, or the capped matmul path for soft-capped layers.

    The sliding window is in `attention_mask` (engine_mask hands transformers' window mask function to
    sdpa_mask); transformers leaves the mask out only when no key is farther back than the window.
    """
    if sliding_window is not None and attention_mask is None and key.shape[2] > sliding_window:
        raise UnsupportedModel(f"{type(module).__name__}: a sliding-window layer came without its window mask")
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    is_causal = attention_mask is None and query.shape[2] > 1 and kwargs.get("is_causal") is not False
    out = capped_attention(query, key, value, attention_mask, is_causal, scaling, softcap, dropout)
    return out.transpose(1, 2).contiguous(), None  # [B, n, heads, head_dim]


def _decode(ctx: AttentionMetadata, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """One batched attention for every decode token, over a view of the cache rows when possible.

    Why a slice with holes: indexing the cache with a row tensor copies every
    row's keys and values per layer and step (bench/NOTES.md, "Decode attention"), and
    rows stop being contiguous as soon as one request finishes before its
    batch-mates. Attending over the whole slice instead costs the holes'
    attention (zero queries, outputs dropped; rows are independent in SDPA, so
    whatever a hole's cache row holds cannot reach the others).
    A windowed layer reads only the keys some row's window reaches, under a per-row window mask.
    """
    d, length = ctx.num_decode, ctx.decode_len
    q = query[0, :, :d].transpose(0, 1).unsqueeze(2)  # [d, heads, 1, head_dim]
    if ctx.decode_index is not None:
        assert isinstance(ctx.decode_rows, slice)
        span = ctx.decode_rows.stop - ctx.decode_rows.start
        q = q.new_zeros(span, *q.shape[1:]).index_copy_(0, ctx.decode_index, q)  # [span, heads, 1, head_dim]
    start, mask = _decode_window(ctx, window) if window is not None and length > window else (0, ctx.decode_mask)
    k = k_cache[ctx.decode_rows, :, start:length]  # [d or span, kv_heads, keys, head_dim]
    v = v_cache[ctx.decode_rows, :, start:length]
    if ctx.fold_groups and softcap is None and q.shape[1] != k.shape[1]:
        rows, heads, kv_heads = q.shape[0], q.shape[1], k.shape[1]
        # Head h reads kv head h // groups: one decode query per head = `groups` queries per kv head.
        folded = q.reshape(rows, kv_heads, heads // kv_heads, q.shape[-1])  # [rows, kv_heads, groups, head_dim]
        o = attend(folded, k, v, mask, False, scaling, None).reshape(rows, heads, 1, -1)  # [rows, heads, 1, hd]
    else:
        o = attend(q, k, v, mask, False, scaling, softcap)
    if ctx.decode_index is not None:
        o = o.index_select(0, ctx.decode_index)  # [d, heads, 1, head_dim]
    return o.squeeze(2)  # [d, heads, head_dim]


def _decode_window(ctx: AttentionMetadata, window: int) -> tuple[int, torch.Tensor]:
    """(first key any decode row's window reaches, [rows, 1, 1, keys] mask), once per step and window."""
    memo = ctx.window_masks.get(("decode", window))
    if memo is None:
        assert ctx.decode_lengths is not None
        start = max(0, ctx.decode_min_len - window)
        memo = (start, decode_window_mask(ctx.decode_lengths, start, ctx.decode_len, window))
        ctx.window_masks[("decode", window)] = memo
    return memo


def _prefill(ctx: AttentionMetadata, index: int, span: PrefillSpan, query: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, scaling: float | None, window: int | None,
             softcap: float | None) -> torch.Tensor:
    end = span.position + span.length
    start, mask = 0, span.mask
    if window is not None and end > window:  # some query's window leaves out the first keys
        memo = ctx.window_masks.get(("prefill", index, window))
        if memo is None:
            first = max(0, span.position - window + 1)
            memo = (first, span_mask(span.position, span.length, first, window, query.device))
            ctx.window_masks[("prefill", index, window)] = memo
        start, mask = memo
    q = query[:, :, span.start:span.start + span.length]  # [1, heads, n, head_dim]
    k = k_cache[span.row:span.row + 1, :, start:end]  # [1, kv_heads, keys, head_dim]
    v = v_cache[span.row:span.row + 1, :, start:end]
    o = attend(q, k, v, mask, mask is None, scaling, softcap)
    return o[0].transpose(0, 1)  # [n, heads, head_dim]


def engine_mask(*args, **kwargs) -> torch.Tensor | None:
    """No mask during an engine step (the metadata encodes it); SDPA's mask otherwise."""
    if current_attention() is not None:
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
