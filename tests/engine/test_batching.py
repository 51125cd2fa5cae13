"""Continuous batching: a greedy request's tokens do not depend on its batch-mates."""

from __future__ import annotations

import asyncio

import pytest

from server.model.load import load_base
from tests.harness import cpu_settings
from tests.engine.conftest import run

# Eight prompts of clearly different lengths (1 to ~60 tokens).
PROMPTS = [
    "Hi",
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,",
    "Translate to German: The weather is lovely today and we should go for a walk by the river.",
    "Q: Why is the sky blue?\nA:",
    "A long list of fruit: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, "
    "mango, nectarine, orange, papaya, quince, raspberry, strawberry",
]


async def alone_then_together(engine, tok, n: int):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    alone = [await run(engine, i, max_new_tokens=n) for i in ids]
    # Staggered starts: each request joins a batch that is already decoding.
    together = await asyncio.gather(*(run(engine, i, delay=0.01 * k, max_new_tokens=n)
                                      for k, i in enumerate(ids)))
    return alone, together


@pytest.mark.parametrize("budget", [512, 24], ids=["budget-512", "budget-24-chunked"])
def test_greedy_is_batch_invariant(make_engine, varied_base, budget):
    engine = make_engine(max_batch=8, max_tokens_per_step=budget)
    alone, together = asyncio.run(alone_then_together(engine, varied_base.tokenizer, 24))
    for prompt, a, b in zip(PROMPTS, alone, together):
        assert a.tokens == b.tokens, prompt
        assert a.text == b.text
    assert engine.stats()["steps"] > 0
    # Every request really shared steps with others: fewer steps than run one by one.
    assert engine.stats()["running"] == 0 and engine.stats()["free_kv_rows"] == 8


def test_batch_really_batches(make_engine, varied_base):
    """8 concurrent requests take far fewer engine steps than 8 sequential ones."""
    engine = make_engine(max_batch=8)
    ids = varied_base.tokenizer("Hello there")["input_ids"]

    async def burst():
        return await asyncio.gather(*(run(engine, ids, max_new_tokens=20) for _ in range(8)))

    before = engine.steps
    results = asyncio.run(burst())
    assert len({tuple(r.tokens) for r in results}) == 1
    assert engine.steps - before < 8 * 20 / 2


def test_more_requests_than_rows_wait_their_turn(make_engine, varied_base):
    engine = make_engine(max_batch=2)
    tok = varied_base.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:5]]

    async def go():
        alone = [await run(engine, i, max_new_tokens=8) for i in ids]
        crowd = await asyncio.gather(*(run(engine, i, max_new_tokens=8) for i in ids))
        return alone, crowd

    alone, crowd = asyncio.run(go())
    assert [a.tokens for a in alone] == [c.tokens for c in crowd]


@pytest.mark.slow
def test_real_model_batch_invariance(make_engine, embedded_model_dir):
    base = load_base(cpu_settings(embedded_model_dir))
    engine = make_engine(base=base, max_batch=8)
    tok = base.tokenizer
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    fillers = PROMPTS[:6]

    async def go():
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chat]
        alone = [await run(engine, i, max_new_tokens=16) for i in ids]
        mixed = await asyncio.gather(
            *(run(engine, i, delay=0.02 * k, max_new_tokens=16) for k, i in enumerate(ids)),
            *(run(engine, tok(f)["input_ids"], delay=0.01 * k, max_new_tokens=16) for k, f in enumerate(fillers)))
        return alone, mixed[:2]

    alone, mixed = asyncio.run(go())
    assert alone[0].text.strip()  # the real model says something
    assert [a.tokens for a in alone] == [m.tokens for m in mixed]
