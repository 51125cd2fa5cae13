"""The engine's KV-cache attention path vs transformers' own generate / forward."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine import kv_cache
from server.engine import step_layout as layout_module
from server.engine.attention import ATTN_IMPL, current_attention
from server.engine.runner import Runner
from server.engine.scheduler import StepPlan
from tests.engine.conftest import run
from tests.engine.fake_sequence import FakeSequence

PROMPTS = ["Hello world", "The capital of France is", "def fibonacci(n):\n    return",
           "Once upon a time, in a land far away, there lived a dragon who loved riddles and"]


@pytest.fixture(scope="module")
def reference(varied_model_dir):
    return AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("budget", [512, 16], ids=["one-chunk", "chunked-prefill"])
def test_kv_path_matches_transformers_generate(make_engine, varied_base, reference, budget, monkeypatch):
    monkeypatch.setattr(kv_cache, "ZERO_CHUNK", 8)  # cross many lazy-zeroing boundaries mid-sequence
    engine = make_engine(max_batch=4, max_tokens_per_step=budget)
    engine.eos_ids = frozenset()  # compare full-length runs, as generate does with eos_token_id=None
    tok = varied_base.tokenizer
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        got = asyncio.run(run(engine, ids, max_new_tokens=24))
        assert got.tokens == hf_greedy(reference, ids, 24), prompt
        assert got.finish_reason == "length"


def test_no_context_falls_back_to_plain_sdpa_with_padding(make_engine, varied_base, reference):
    """The trainer runs ordinary (padded, grad-enabled) forwards on the engine's model."""
    make_engine()  # installs the engine attention on the shared model
    model = varied_base.model
    assert model.config._attn_implementation == ATTN_IMPL
    assert current_attention() is None
    batch = varied_base.tokenizer(["short", "a much longer prompt with padding"], return_tensors="pt",
                                  padding=True)
    with torch.no_grad():
        ours = model(**batch).logits
        ref = reference(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-4, atol=1e-4)


def test_lazy_zeroing_never_touches_written_positions(monkeypatch):
    monkeypatch.setattr(kv_cache, "ZERO_CHUNK", 4)
    cache = kv_cache.KVCache(1, 2, 1, 32, 2, torch.device("cpu"), torch.float32)
    cache.ensure_initialized([0], 3)
    cache.k[0][0, :, :3] = 7.0  # a sequence wrote positions 0..2
    cache.ensure_initialized([0, 1], 10)  # a longer batch-mate arrives
    assert torch.all(cache.k[0][0, :, :3] == 7.0)
    assert torch.all(cache.k[0][0, :, 3:10] == 0) and torch.all(cache.k[0][1, :, :10] == 0)


def _decode_logits(runner: Runner, seqs: list[FakeSequence]) -> torch.Tensor:
    return runner.forward(StepPlan(None, seqs, []))


def test_decode_rows_with_holes_match_the_gathered_rows(varied_base, monkeypatch):
    """Rows stop being contiguous once a request finishes before its batch-mates: the decode
    attention then spans the holes (zero queries, outputs dropped) instead of copying rows out.
    Same logits as the gather path and as each sequence alone, whatever a hole's cache holds."""
    cache = kv_cache.KVCache.for_model(varied_base.model.config, 8, 64, varied_base.device, varied_base.dtype)
    runner = Runner(varied_base, cache)
    seqs = [FakeSequence(list(range(3, 3 + n)), row=i) for i, n in enumerate((5, 9, 7, 12, 6, 8))]
    for s in seqs:
        runner.forward(StepPlan(None, [], [(s, s.prompt_len)]))
        s.prefilled, s.generated = s.prompt_len, 1
    live = [seqs[0], seqs[2], seqs[3], seqs[5]]  # rows 1 and 4 finished: holes
    spanned = _decode_logits(runner, live)
    for hole in (1, 4):  # whatever a hole's row holds stays in that row
        for t in (*cache.k, *cache.v):
            t[hole].fill_(float("nan"))
    assert torch.equal(_decode_logits(runner, live), spanned)
    assert torch.isfinite(spanned).all()
    shuffled = [live[2], live[0], live[3], live[1]]  # not in row order: a permutation of the span
    torch.testing.assert_close(_decode_logits(runner, shuffled), spanned[[2, 0, 3, 1]], rtol=0, atol=0)
    alone = torch.cat([_decode_logits(runner, [s]) for s in live])
    torch.testing.assert_close(spanned, alone, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(layout_module, "MAX_SPAN_PER_ROW", 0)  # force the row gather
    torch.testing.assert_close(_decode_logits(runner, live), spanned, rtol=1e-6, atol=1e-6)


def test_new_rows_are_zeroed_together_and_only_where_unwritten(monkeypatch):
    """A batch of new rows is zeroed as runs of consecutive rows (one op per run and tensor, not per row),
    each from its own watermark: a row already written is never wiped."""
    monkeypatch.setattr(kv_cache, "ZERO_CHUNK", 4)
    cache = kv_cache.KVCache(1, 6, 1, 32, 2, torch.device("cpu"), torch.float32)
    for t in (*cache.k, *cache.v):
        t.fill_(float("nan"))
    cache.ensure_initialized([2], 3)
    cache.k[0][2, :, :3] = 7.0
    calls = []
    original = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_", lambda self: calls.append(self.shape) or original(self))
    cache.ensure_initialized([4, 0, 1, 2, 3], 8)  # rows 0, 1 | 2 (from 4) | 3, 4
    assert len(calls) == 3 * 2
    assert torch.all(cache.k[0][2, :, :3] == 7.0) and torch.all(cache.k[0][2, :, 4:8] == 0)
    for row in (0, 1, 3, 4):
        assert torch.all(cache.k[0][row, :, :8] == 0) and torch.all(cache.v[0][row, :, :8] == 0)
    assert torch.isnan(cache.k[0][5]).all()
