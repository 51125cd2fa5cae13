"""Batched sampler: greedy, temperature, top-k, top-p and per-request seeds."""

from __future__ import annotations

import asyncio

import torch

from server.engine.request import SamplingParams
from server.engine.sampling import SamplingBatch, sample
from tests.engine.conftest import run

VOCAB = 50


def batch(params: list[SamplingParams], seeds: list[int | None] | None = None) -> SamplingBatch:
    gens = []
    for p, seed in zip(params, seeds or [0] * len(params)):
        g = None
        if not p.greedy:
            g = torch.Generator()
            g.manual_seed(seed if seed is not None else 0)
        gens.append(g)
    return SamplingBatch.build(params, gens, VOCAB, torch.device("cpu"))


def test_greedy_rows_are_argmax_whatever_the_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(),
              SamplingParams(temperature=0.7, top_k=3)]
    out = sample(logits, batch(params))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_one_and_tiny_top_p_are_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 3 + [SamplingParams(temperature=1.5, top_p=1e-6)] * 3
    out = sample(logits, batch(params, seeds=[1, 2, 3, 4, 5, 6]))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.linspace(5, 0, VOCAB).repeat(200, 1)  # token 0 most likely, strictly decreasing
    k_out = sample(logits, batch([SamplingParams(temperature=5.0, top_k=4)] * 200, seeds=list(range(200))))
    assert set(k_out.tolist()) <= {0, 1, 2, 3} and len(set(k_out.tolist())) > 1
    probs = torch.softmax(logits[0] / 5.0, -1)
    nucleus = int((probs.cumsum(-1) - probs < 0.3).sum())  # tokens needed to reach 30% mass
    p_out = sample(logits, batch([SamplingParams(temperature=5.0, top_p=0.3)] * 200, seeds=list(range(200))))
    assert max(p_out.tolist()) < nucleus and len(set(p_out.tolist())) > 1


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2] + [1e-9] * (VOCAB - 3))).repeat(3000, 1)
    out = sample(logits, batch([SamplingParams(temperature=1.0)] * 3000, seeds=list(range(3000))))
    freq = torch.bincount(out, minlength=VOCAB)[:3].float() / 3000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_seeded_request_is_reproducible_alone_or_in_a_batch(make_engine, varied_base):
    engine = make_engine(max_batch=8)
    ids = varied_base.tokenizer("Tell me a story")["input_ids"]
    params = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)

    async def go():
        first = await run(engine, ids, seed=1234, **params)
        crowd = await asyncio.gather(run(engine, ids, seed=1234, **params),
                                     *(run(engine, ids, seed=s, **params) for s in range(5)))
        other = await run(engine, ids, seed=99, **params)
        return first, crowd, other

    first, crowd, other = asyncio.run(go())
    assert crowd[0].tokens == first.tokens
    assert other.tokens != first.tokens  # a different seed really samples differently
    assert len({tuple(c.tokens) for c in crowd}) > 1
