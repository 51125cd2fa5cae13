"""One step's token selection for a whole batch: processors, grammar masks, sampling, logprobs.

Why a separate stage: most steps are plain (no penalties, logprobs or
grammar) and must stay as cheap as before, so they go straight to `sample`
after one flag check per row; only when some row asks for more does the step
run the batched processors (penalties.py), the grammar masks (grammar.py) and
the logprob extraction (logprobs.py), each touching only the rows that asked.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence as Seq

import torch

from server.engine.grammar import GrammarMasks
from server.engine.logprobs import token_logprobs
from server.engine.penalties import PenaltyState
from server.engine.request import TokenLogprob
from server.engine.sampling import SamplingBatch, sample, sample_with_distribution
from server.engine.sequence import Sequence


class StepSampler:
    def __init__(self, rows: int, vocab: int, device: torch.device, eos_ids: Collection[int]) -> None:
        self.vocab, self.device = vocab, device
        self.penalties = PenaltyState(rows, vocab, device, eos_ids)
        self.masks = GrammarMasks(rows, vocab)

    def start(self, seq: Sequence) -> None:
        """A sequence took its KV row: reset that row's penalty state if it needs one."""
        if seq.request.params.penalized:
            self.penalties.start(seq.row, seq.request.prompt_ids)

    def resume(self, seq: Sequence) -> None:
        """A preempted sequence took a new KV row: rebuild that row's penalty state from its output so far."""
        if seq.request.params.penalized:
            self.penalties.start(seq.row, seq.request.prompt_ids, seq.output)

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [len(seqs), vocab] (modified in place) → a token per row, and its logprobs where asked."""
        params = [s.request.params for s in seqs]
        plain = not any(s.special for s in seqs)
        if plain and all(p.greedy for p in params):  # no parameter tensors: argmax, and the step's one read
            return logits.argmax(dim=-1).tolist(), []
        batch = SamplingBatch.build(params, [s.generator for s in seqs], self.vocab, logits.device)
        if plain:
            return sample(logits, batch).tolist(), []
        with torch.inference_mode():
            self.penalties.apply(logits, seqs)
            self.masks.apply(logits, seqs)
            tokens, scaled = sample_with_distribution(logits, batch)
            logprobs = token_logprobs(logits, scaled, [p.greedy for p in params], tokens,
                                      [p.logprobs for p in params])
            out = tokens.tolist()
            self.penalties.record(seqs, out)
        return out, logprobs
