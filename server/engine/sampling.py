"""Batched next-token selection: greedy, temperature, top-k, top-p, per-request seeds.

Why inverse-CDF sampling with one uniform draw per row: each request owns a
CPU `torch.Generator` (seeded → reproducible, whatever else is in the batch and
whatever the device), yet the heavy work (softmax, filtering, cumsum, search)
stays one batched tensor op over the whole step. Greedy rows never touch a
generator and are pure argmax, so they are deterministic and batch-invariant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device."""

    greedy: torch.Tensor  # [rows] bool
    temperature: torch.Tensor  # [rows] float32 (1.0 where greedy, unused)
    top_p: torch.Tensor  # [rows] float32
    top_k: torch.Tensor  # [rows] long (vocab size where off)
    uniforms: torch.Tensor  # [rows] float32 in [0, 1): one draw per sampled row
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              vocab: int, device: torch.device) -> "SamplingBatch":
        greedy = [p.greedy for p in params]
        draws = [float(torch.rand((), generator=g)) if (g is not None and not gr) else 0.0
                 for g, gr in zip(generators, greedy, strict=True)]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        return cls(
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            temperature=torch.tensor([p.temperature if not g else 1.0 for p, g in zip(params, greedy)],
                                     dtype=torch.float32, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            uniforms=torch.tensor(draws, dtype=torch.float32, device=device),
            all_greedy=all(greedy),
            any_top_k=any(k < vocab for k in top_k),
            any_top_p=any(p.top_p < 1.0 for p in params),
        )


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits: [rows, vocab] float32 → next token ids [rows] long."""
    return sample_with_distribution(logits, batch)[0]


def sample_with_distribution(logits: torch.Tensor,
                             batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token ids [rows], and the logits the sampled rows drew from ([rows, vocab]; None if all greedy).

    A greedy row draws from `logits` itself (its argmax); a sampled row from
    its temperature-scaled logits with the tokens outside top-k / top-p at -inf
    (that row of the second tensor).
    """
    argmax = logits.argmax(dim=-1)  # [rows]
    if batch.all_greedy:
        return argmax, None
    scaled = logits / batch.temperature.unsqueeze(1)  # [rows, vocab]
    if batch.any_top_k or batch.any_top_p:
        scaled = _filter(scaled, batch)
    probs = torch.softmax(scaled, dim=-1)  # [rows, vocab]
    cdf = probs.cumsum(dim=-1)  # [rows, vocab]
    target = (batch.uniforms * cdf[:, -1]).unsqueeze(1)  # [rows, 1]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    # A row can never land on a token of zero probability (right=True skips flat
    # cdf runs), except through rounding at the very top; guard it.
    drawn = torch.where(probs.gather(1, drawn.unsqueeze(1)).squeeze(1) > 0, drawn, argmax)
    return torch.where(batch.greedy, argmax, drawn), scaled


def _filter(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [rows, vocab]
    vocab = scaled.shape[-1]
    rank = torch.arange(vocab, device=scaled.device).unsqueeze(0)  # [1, vocab]
    drop = rank >= batch.top_k.unsqueeze(1)  # [rows, vocab] outside top-k
    if batch.any_top_p:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        drop |= before >= batch.top_p.unsqueeze(1)  # the top token always survives (before = 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
