"""PenaltyState against the definitions' reference implementations (transformers' logits processors)."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from server.engine.detokenizer import Detokenizer
from server.engine.penalties import PenaltyState
from server.engine.request import Request, SamplingParams
from server.engine.sequence import Sequence

VOCAB = 64


class _Stream:
    def put(self, event) -> None:
        pass


def _seq(row: int, prompt: list[int], **params) -> Sequence:
    request = Request(prompt, SamplingParams(max_new_tokens=8, **params), _Stream())  # type: ignore[arg-type]
    return Sequence(request=request, row=row, detok=Detokenizer.__new__(Detokenizer), generator=None)


def test_batched_penalties_equal_their_definitions():
    g = torch.Generator().manual_seed(0)
    state = PenaltyState(rows=4, vocab=VOCAB, device=torch.device("cpu"), eos_ids={2})
    seqs = [_seq(3, [5, 6, 7], repetition_penalty=1.7), _seq(0, [8], frequency_penalty=0.6, presence_penalty=0.3),
            _seq(1, [9]), _seq(2, [10], logit_bias=((4, 3.0), (11, -2.0)), min_tokens=2, stop_token_ids=(12,))]
    for s in seqs:
        if s.request.params.penalized:
            state.start(s.row, s.request.prompt_ids)
    outputs = [[20, 21, 20], [30, 30, 31], [40], []]
    for step in range(3):
        tokens = [out[step] if step < len(out) else 0 for out in outputs]
        state.record([s for s, out in zip(seqs, outputs) if step < len(out)],
                     [t for t, out in zip(tokens, outputs) if step < len(out)])
    for s, out in zip(seqs, outputs):
        s.generated = len(out)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    got = logits.clone()
    state.apply(got, seqs)

    hf = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[5, 6, 7, 20, 21, 20]]), logits[0:1].clone())
    torch.testing.assert_close(got[0], hf[0])
    counts = torch.bincount(torch.tensor([30, 30, 31]), minlength=VOCAB).float()
    torch.testing.assert_close(got[1], logits[1] - 0.6 * counts - 0.3 * (counts > 0).float())
    torch.testing.assert_close(got[2], logits[2])  # no penalty: untouched
    want = logits[3].clone()
    want[4] += 3.0
    want[11] -= 2.0
    want[2] = want[12] = float("-inf")  # min_tokens: EOS and the stop token id are blocked
    torch.testing.assert_close(got[3], want)


def test_a_resumed_row_gets_the_state_its_old_row_had():
    """Preemption moves a sequence to another KV row: its counts are rebuilt from its output, whatever the new
    row held before."""
    state = PenaltyState(rows=3, vocab=VOCAB, device=torch.device("cpu"), eos_ids={2})
    prompt, output = [5, 6, 7], [20, 21, 20, 33]
    old = _seq(0, prompt, frequency_penalty=0.5)
    state.start(0, prompt)
    for token in output:
        state.record([old], [token])
    state.start(2, [9, 9])
    state.record([_seq(2, [9, 9], frequency_penalty=0.5)], [40])  # another sequence used row 2 before
    state.start(2, prompt, output)
    assert torch.equal(state.counts[2], state.counts[0]) and torch.equal(state.seen_prompt[2], state.seen_prompt[0])
