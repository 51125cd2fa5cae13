"""The attention arithmetic the engine needs beyond plain SDPA: sliding windows and logit soft-capping.

Semantics follow transformers' masks exactly: a query at absolute position p
sees key positions k with `p - window < k <= p` (`sliding_window_overlay`), and
a soft-capped layer scores `tanh(q·kᵀ·scale / cap) · cap` before masking and
softmax (Gemma 2's eager attention). SDPA has no soft-cap, so capped layers
take a matmul path, in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           is_causal: bool, scaling: float | None, softcap: float | None, dropout: float = 0.0) -> torch.Tensor:
    """[B, heads, n, hd] attention of `query` over `key`/`value` ([B, kv_heads, L, hd], grouped heads).

    `mask`: bool, broadcastable to [B, 1, n, L] (True = attend); `is_causal`: top-left causal, as SDPA.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout, scale=scaling, enable_gqa=True)
    return capped_attention(query, key, value, mask, is_causal, scaling, softcap, dropout)


def capped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     is_causal: bool, scaling: float | None, softcap: float, dropout: float = 0.0) -> torch.Tensor:
    """Soft-capped attention, scores and softmax accumulated in float32, rounded once to the query's dtype."""
    b, heads, n, hd = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = hd ** -0.5 if scaling is None else scaling
    # Head h reads kv head h // groups (transformers' repeat_kv): group the queries under their kv head.
    q = query.float().reshape(b, kv_heads, groups * n, hd)  # [B, kv_heads, groups·n, hd]
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, kv_heads, groups·n, L]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv_heads, groups, n, length)
    if is_causal:
        mask = causal_mask(n, length, query.device)
    if mask is not None:
        if mask.dim() == 2:  # [n, L] → [1, 1, n, L]
            mask = mask.view(1, 1, n, length)
        if mask.dtype != torch.bool:  # an additive float mask (transformers' eager/sdpa convention)
            scores = scores + mask.float().unsqueeze(2)
        else:
            # finfo.min rather than -inf: a fully masked row (padding) stays finite, as in transformers' eager
            scores = scores.masked_fill(~mask.unsqueeze(2), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).view(b, kv_heads, groups * n, length)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value.float())  # [B, kv_heads, groups·n, hd]
    return out.view(b, heads, n, hd).to(query.dtype)


def causal_mask(n: int, length: int, device: torch.device) -> torch.Tensor:
    """[n, length] bool, top-left aligned (SDPA's is_causal): query i sees keys 0..i."""
    return torch.arange(n, device=device).unsqueeze(1) >= torch.arange(length, device=device).unsqueeze(0)


def span_mask(position: int, n: int, key_start: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, end - key_start] bool for queries at positions position..position+n-1 over keys key_start..end-1."""
    keys = torch.arange(key_start, position + n, device=device).unsqueeze(0)  # [1, keys]
    queries = torch.arange(position, position + n, device=device).unsqueeze(1)  # [n, 1]
    seen = keys <= queries
    if window is not None:
        seen &= keys > queries - window
    return seen


def decode_window_mask(lengths: torch.Tensor, key_start: int, key_end: int, window: int) -> torch.Tensor:
    """[rows, 1, 1, key_end - key_start] bool: a decode row of length ℓ (query at ℓ - 1) sees keys ℓ - window .. ℓ - 1."""
    keys = torch.arange(key_start, key_end, device=lengths.device).unsqueeze(0)  # [1, keys]
    ends = lengths.unsqueeze(1)  # [rows, 1]
    return ((keys < ends) & (keys >= ends - window)).view(len(lengths), 1, 1, key_end - key_start)
