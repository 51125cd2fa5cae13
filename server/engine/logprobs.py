"""Log-probabilities of sampled tokens and their top alternatives, batched over the rows that ask.

Computed from the distribution each row drew from: a greedy row's processed
logits (penalties, biases and grammar mask applied; no temperature), a sampled
row's temperature-scaled logits after top-k / top-p (tokens outside at -inf).
A token the row could not draw has logprob -inf, reported as `FLOOR` (JSON has
no infinity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from server.engine.request import TokenLogprob

FLOOR = -9999.0


def token_logprobs(logits: torch.Tensor, scaled: torch.Tensor | None, greedy: Seq[bool], tokens: torch.Tensor,
                   ks: Seq[int | None]) -> list[TokenLogprob | None]:
    """logits / scaled: [rows, vocab]; tokens: [rows]; ks[i]: alternatives for row i (None = not asked)."""
    out: list[TokenLogprob | None] = [None] * len(ks)
    wanted = [i for i, k in enumerate(ks) if k is not None]
    if not wanted:
        return out
    at = torch.tensor(wanted, device=logits.device)
    dist = logits.index_select(0, at)  # [m, vocab]
    if scaled is not None:
        sampled = torch.tensor([not greedy[i] for i in wanted], device=logits.device).unsqueeze(1)
        dist = torch.where(sampled, scaled.index_select(0, at), dist)
    lp = torch.log_softmax(dist, dim=-1)  # [m, vocab]
    chosen = lp.gather(1, tokens.index_select(0, at).unsqueeze(1)).squeeze(1).tolist()  # [m]
    kmax = max(ks[i] or 0 for i in wanted)
    top_vals: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if kmax:
        vals, ids = lp.topk(min(kmax, lp.shape[-1]), dim=-1)  # [m, kmax]
        top_vals, top_ids = vals.tolist(), ids.tolist()
    chosen_ids = tokens.index_select(0, at).tolist()
    for j, i in enumerate(wanted):
        k = ks[i] or 0
        top = tuple((t, _finite(v)) for t, v in zip(top_ids[j][:k], top_vals[j][:k], strict=True))
        out[i] = TokenLogprob(int(chosen_ids[j]), _finite(chosen[j]), top)
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR
