"""StepSampler: a plain all-greedy step is one argmax and one read, with no per-row parameter tensors."""

from __future__ import annotations

import torch

from server.engine import decoding
from server.engine.decoding import StepSampler
from server.engine.request import SamplingParams


class _Seq:
    def __init__(self, params: SamplingParams, row: int) -> None:
        self.request = type("R", (), {"params": params, "prompt_ids": [1]})()
        self.row, self.generator, self.special = row, None, False


def test_all_greedy_plain_step_builds_no_sampling_batch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("SamplingBatch built for an all-greedy step")

    monkeypatch.setattr(decoding.SamplingBatch, "build", refuse)
    sampler = StepSampler(4, 16, torch.device("cpu"), eos_ids=[0])
    logits = torch.randn(3, 16)
    tokens, logprobs = sampler.sample(logits, [_Seq(SamplingParams(), i) for i in range(3)])
    assert tokens == logits.argmax(-1).tolist() and logprobs == []


def test_a_sampled_row_still_gets_its_batch(monkeypatch):
    built = []
    original = decoding.SamplingBatch.build
    monkeypatch.setattr(decoding.SamplingBatch, "build", lambda *a, **k: built.append(1) or original(*a, **k))
    sampler = StepSampler(4, 16, torch.device("cpu"), eos_ids=[0])
    seqs = [_Seq(SamplingParams(), 0), _Seq(SamplingParams(temperature=0.7), 1)]
    seqs[1].generator = torch.Generator().manual_seed(1)
    tokens, _ = sampler.sample(torch.randn(2, 16), seqs)
    assert len(tokens) == 2 and built == [1]
