"""Penalties and biases applied to a step's logits as batched tensor ops, per row.

Why per-KV-row state on the device: frequency/presence penalties need how often
each token occurs in a sequence's output, and the repetition penalty which
tokens its prompt or output contain. Re-counting from Python lists every step
is O(length · rows); instead each KV row owns a `[vocab]` count vector that is
updated incrementally with one scatter per step (and a prompt mask set once at
admission). The state is allocated on first use, so servers whose clients
never ask for a penalty pay nothing.

Definitions (what each row's logits go through, in this order):
- logit_bias: `logits[t] += bias[t]` (OpenAI);
- min_tokens: EOS and `stop_token_ids` at -inf until `min_tokens` tokens exist;
- repetition_penalty `r` (HF/vLLM): for tokens in the prompt or output,
  `logit / r` if positive else `logit * r`;
- frequency `f` / presence `p` (OpenAI): `logit -= f * count + p * (count > 0)`,
  counts over the output only.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence as Seq

import torch

from server.engine.sequence import Sequence


class PenaltyState:
    def __init__(self, rows: int, vocab: int, device: torch.device, eos_ids: Collection[int]) -> None:
        self.rows, self.vocab, self.device = rows, vocab, device
        self.eos_ids = tuple(sorted(eos_ids))
        self.counts: torch.Tensor | None = None  # [rows, vocab] int32: occurrences in each row's output
        self.seen_prompt: torch.Tensor | None = None  # [rows, vocab] bool: tokens of each row's prompt

    def _allocate(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.rows, self.vocab, dtype=torch.int32, device=self.device)
            self.seen_prompt = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)

    def start(self, row: int, prompt_ids: Seq[int], output: Seq[int] = ()) -> None:
        """A penalized sequence takes KV row `row`: mark its prompt tokens, count its `output` so far (a
        preempted sequence resuming on a new row; none for a new one)."""
        self._allocate()
        assert self.counts is not None and self.seen_prompt is not None
        self.counts[row].zero_()
        if output:
            ids = torch.tensor(list(output), dtype=torch.long, device=self.device)
            self.counts[row] += torch.bincount(ids, minlength=self.vocab).to(torch.int32)
        self.seen_prompt[row].zero_()
        self.seen_prompt[row, torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True

    def apply(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        """In place on the logits rows [len(seqs), vocab] of the penalized sequences."""
        picked = [(i, s) for i, s in enumerate(seqs) if s.request.params.penalized]
        if not picked:
            return
        self._bias(logits, picked)
        self._min_tokens(logits, picked)
        self._penalize(logits, picked)

    def record(self, seqs: Seq[Sequence], tokens: Seq[int]) -> None:
        """Count each penalized row's newly sampled token (one scatter)."""
        pairs = [(s.row, t) for s, t in zip(seqs, tokens, strict=True) if s.request.params.penalized]
        if not pairs or self.counts is None:
            return
        rows, toks = zip(*pairs, strict=True)
        index = (torch.tensor(rows, device=self.device), torch.tensor(toks, device=self.device))
        self.counts.index_put_(index, torch.ones(len(rows), dtype=torch.int32, device=self.device),
                               accumulate=True)

    def _bias(self, logits: torch.Tensor, picked: list[tuple[int, Sequence]]) -> None:
        rows: list[int] = []
        toks: list[int] = []
        vals: list[float] = []
        for i, s in picked:
            for token, bias in s.request.params.logit_bias:
                rows.append(i)
                toks.append(token)
                vals.append(bias)
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(toks, device=logits.device))
            logits.index_put_(index, torch.tensor(vals, dtype=logits.dtype, device=logits.device), accumulate=True)

    def _min_tokens(self, logits: torch.Tensor, picked: list[tuple[int, Sequence]]) -> None:
        rows: list[int] = []
        toks: list[int] = []
        for i, s in picked:
            p = s.request.params
            if s.generated < p.min_tokens:
                banned = (*self.eos_ids, *p.stop_token_ids)
                rows.extend([i] * len(banned))
                toks.extend(banned)
        if rows:
            logits[torch.tensor(rows, device=logits.device), torch.tensor(toks, device=logits.device)] = float("-inf")

    def _penalize(self, logits: torch.Tensor, picked: list[tuple[int, Sequence]]) -> None:
        picked = [(i, s) for i, s in picked if _has_penalty(s)]
        if not picked or self.counts is None or self.seen_prompt is None:
            return
        dev = logits.device
        at = torch.tensor([i for i, _ in picked], device=dev)  # [m] logits rows
        kv = torch.tensor([s.row for _, s in picked], device=dev)  # [m] state rows
        params = [s.request.params for _, s in picked]
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)  # [m, 1]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
        counts = self.counts.index_select(0, kv).float()  # [m, vocab]
        seen = (counts > 0) | self.seen_prompt.index_select(0, kv)  # [m, vocab]
        rows = logits.index_select(0, at)  # [m, vocab]
        rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
        rows = rows - freq * counts - pres * (counts > 0).float()
        logits.index_copy_(0, at, rows)


def _has_penalty(s: Sequence) -> bool:
    p = s.request.params
    return bool(p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0)
