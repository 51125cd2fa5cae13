"""Prefix cache in the engine: exact reuse, namespaces (adapter key, version, merged lane), eviction, chunking.

The varied tiny model's outputs depend on the whole context, so a wrong or misplaced cached block changes
greedy tokens. The adapter manager here is the documented protocol with no adapter math (slots change no
weights): these tests check which KV is reused; tests/api/test_prefix_cache_http.py checks real adapters.
"""

from __future__ import annotations

import asyncio
import random

import torch

from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from bench.engine_requests import generate
from server.engine.request import SamplingParams

_rng = random.Random(0)
SYSTEM = [_rng.randrange(100, 40000) for _ in range(5 * BLOCK_TOKENS + 7)]  # 167 tokens: 5 full blocks


class Manager:
    def __init__(self, slots: dict[str, int], lanes: dict[str, int] | None = None) -> None:
        self.slots, self.lanes = slots, lanes or {}

    def acquire(self, key: str) -> int | None:
        return self.slots.get(key)

    def release(self, key: str) -> None:
        pass

    def lane_of(self, key: str) -> int | None:
        return self.lanes.get(key)

    def pin(self, key: str) -> None:
        pass


async def collect(engine, prompt: list[int], key: str | None = None, **params) -> list[int]:
    choices = await generate(engine, prompt, SamplingParams(**{"max_new_tokens": 8, **params}), adapter_key=key,
                             timeout_s=60)
    return [t for choice in choices for t in choice]


def questions(k: int) -> list[list[int]]:
    return [SYSTEM + [2000 + 13 * i + j for j in range(5 + i % 3)] for i in range(k)]


def run_all(engine, jobs: list[tuple[list[int], str | None]], **params) -> list[list[int]]:
    async def go():
        return await asyncio.gather(*(collect(engine, p, key, **params) for p, key in jobs))
    return asyncio.run(go())


def test_greedy_tokens_equal_without_the_cache_in_mixed_batches(make_engine) -> None:
    manager = Manager({"a": 1, "b": 2})
    cold = make_engine(max_batch=6, prefix_cache_tokens=0, placement=manager)
    warm = make_engine(max_batch=6, placement=manager)
    jobs = [(q, key) for q, key in zip(questions(6), [None, "a", "b", None, "a", "b"])]
    expected = run_all(cold, jobs)
    first = run_all(warm, jobs[:3])  # one per namespace: all miss, then store the system prompt's blocks
    assert warm.stats()["prefix_hit_tokens"] == 0 and warm.prefix_cache.cached_blocks == 15
    second = run_all(warm, jobs)  # mixed batch, every prompt hits its own namespace's blocks
    assert first == expected[:3] and second == expected
    for key in (None, "a", "b"):
        assert warm.prefix_hit_tokens[key] == 2 * 5 * BLOCK_TOKENS
    assert cold.stats()["prefix_hit_tokens"] == 0 and cold.prefix_cache.cached_blocks == 0


def test_a_new_adapter_version_or_a_merged_lane_never_reuses_other_kv(make_engine) -> None:
    manager = Manager({"t/a@v1": 1, "t/a@v2": 1})
    engine = make_engine(max_batch=4, placement=manager)
    prompt = questions(1)[0]
    run_all(engine, [(prompt, "t/a@v1")])
    run_all(engine, [(prompt, "t/a@v2")])  # a re-upload is a new key: a miss
    assert engine.prefix_hit_tokens["t/a@v2"] == 0
    run_all(engine, [(prompt, "t/a@v2")])
    assert engine.prefix_hit_tokens["t/a@v2"] == 5 * BLOCK_TOKENS
    manager.lanes["t/a@v2"] = 1  # now served by a merged copy: its own namespace
    run_all(engine, [(prompt, "t/a@v2")])
    assert engine.prefix_hit_tokens["t/a@v2"] == 5 * BLOCK_TOKENS
    assert engine.prefix_lookup_tokens["t/a@v2"] == 3 * len(prompt)


def test_eviction_under_a_tiny_capacity_never_changes_running_outputs(make_engine) -> None:
    cold = make_engine(max_batch=8, prefix_cache_tokens=0, max_tokens_per_step=64)
    tiny = make_engine(max_batch=8, prefix_cache_tokens=3 * BLOCK_TOKENS, max_tokens_per_step=64)
    prompts = [[_rng.randrange(100, 40000) for _ in range(4 * BLOCK_TOKENS + 3)] for _ in range(4)]
    jobs = [(p, None) for p in prompts + questions(4)]
    expected = run_all(cold, jobs, max_new_tokens=12)
    for _ in range(2):  # chunked prefills, stores evicting each other's blocks while others decode
        assert run_all(tiny, jobs, max_new_tokens=12) == expected
    assert tiny.prefix_cache.cached_blocks <= 3
    assert tiny.stats()["prefix_hit_tokens"] > 0, "no prefix reused: this test would prove nothing"


def test_chunked_prefill_after_a_cached_prefix_and_n_forks(make_engine) -> None:
    cold = make_engine(max_batch=6, prefix_cache_tokens=0, max_tokens_per_step=40)
    warm = make_engine(max_batch=6, max_tokens_per_step=40)
    long_question = SYSTEM + list(range(4000, 4090))  # 90 tokens past the cached prefix: three chunks
    jobs = [(questions(1)[0], None), (long_question, None)]
    expected = run_all(cold, jobs)
    run_all(warm, jobs[:1])
    assert run_all(warm, jobs) == expected
    assert warm.stats()["prefix_hit_tokens"] == 2 * 5 * BLOCK_TOKENS
    forks = dict(n=3, temperature=1.0, seed=5)
    assert run_all(warm, jobs, **forks) == run_all(cold, jobs, **forks)


def test_a_prompt_of_whole_blocks_still_prefills_its_last_token(make_engine) -> None:
    cold = make_engine(max_batch=2, prefix_cache_tokens=0)
    warm = make_engine(max_batch=2)
    prompt = SYSTEM[:4 * BLOCK_TOKENS]
    expected = run_all(cold, [(prompt, None)], max_new_tokens=24)
    for _ in range(2):
        assert run_all(warm, [(prompt, None)], max_new_tokens=24) == expected
    assert warm.stats()["prefix_hit_tokens"] == 3 * BLOCK_TOKENS


def small_cache() -> KVCache:
    return KVCache(num_layers=2, max_batch=3, kv_heads=2, max_seq_len=256, head_dim=4,
                   device=torch.device("cpu"), dtype=torch.float32)


def test_a_stored_prefix_loads_as_an_exact_copy_into_another_row() -> None:
    cache = small_cache()
    prefix = PrefixCache(cache, capacity_tokens=8 * BLOCK_TOKENS)
    cache.ensure_initialized([0], 100)
    for t in (*cache.k, *cache.v):
        t[0].normal_()
    prompt = list(range(100))  # 3 full blocks
    prefix.store("ns", prompt, row=0)
    assert prefix.load("other", prompt, row=1) == 0
    assert prefix.load("ns", prompt[:3 * BLOCK_TOKENS], row=1) == 2 * BLOCK_TOKENS  # the last token is left
    assert prefix.load("ns", prompt, row=1) == 3 * BLOCK_TOKENS
    assert prefix.load("ns", [7, *prompt[1:]], row=2) == 0  # a block counts only after the same prefix
    for t in (*cache.k, *cache.v):
        assert torch.equal(t[1, :, :96], t[0, :, :96])


def test_lru_evicts_whole_old_chains_and_a_chain_larger_than_the_pool_keeps_its_head() -> None:
    cache = small_cache()
    cache.ensure_initialized([0], 200)
    prefix = PrefixCache(cache, capacity_tokens=2 * BLOCK_TOKENS)
    a, b = list(range(70)), list(range(500, 570))
    prefix.store("ns", a, row=0)
    prefix.store("ns", b, row=0)
    assert prefix.load("ns", a, row=1) == 0 and prefix.load("ns", b, row=1) == 2 * BLOCK_TOKENS
    long = list(range(1000, 1000 + 5 * BLOCK_TOKENS + 1))
    prefix.store("ns", long, row=0)
    assert prefix.load("ns", long, row=1) == 2 * BLOCK_TOKENS and prefix.cached_blocks == 2


def test_no_room_for_the_pool_turns_the_cache_off_instead_of_failing(monkeypatch) -> None:
    cache = small_cache()
    cache.ensure_initialized([0], 100)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(torch, "zeros", no_memory)
    prefix = PrefixCache(cache, capacity_tokens=8 * BLOCK_TOKENS)
    monkeypatch.undo()
    prefix.store("ns", list(range(100)), row=0)
    assert not prefix.enabled and prefix.cached_blocks == 0
    assert prefix.load("ns", list(range(100)), row=1) == 0


def test_a_failing_cache_costs_work_not_requests(make_engine, monkeypatch) -> None:
    cold = make_engine(max_batch=2, prefix_cache_tokens=0)
    warm = make_engine(max_batch=2)
    prompt = questions(1)[0]
    expected = run_all(cold, [(prompt, None)])
    run_all(warm, [(prompt, None)])

    def broken(*args, **kwargs):
        raise RuntimeError("device error")

    monkeypatch.setattr(warm.prefix_cache, "load", broken)
    monkeypatch.setattr(warm.prefix_cache, "store", broken)
    assert run_all(warm, [(prompt, None)]) == expected
    assert warm.alive and warm.stats()["prefix_hit_tokens"] == 0 and warm.stats()["step_errors"] == 0


def test_identical_prompts_queued_together_reuse_the_first_ones_blocks(varied_base) -> None:
    """Admitted in one pass, every copy would prefill the system prompt (nothing is cached until a prefill
    ends): the others wait for the first one's prefill, then copy its blocks."""
    from server.engine.engine import Engine
    from server.engine.request import FinishEvent, Request, RequestStream, TokenEvent
    from server.settings import Settings

    engine = Engine(varied_base, Settings(model="unused", device="cpu", dtype="float32", max_batch=4))
    prompts = [SYSTEM + [2000, 2001], SYSTEM + [2000, 2001], SYSTEM + [3000], SYSTEM[:40]]

    async def go():
        requests = [Request(list(p), SamplingParams(max_new_tokens=4), RequestStream()) for p in prompts]
        for r in requests:
            engine.waiting.push(r)  # all queued before the engine's first pass
        engine.start()
        out = []
        for r in requests:
            tokens, done = [], None
            while done is None:
                event = await asyncio.wait_for(r.stream.get(), 60)
                tokens += event.token_ids if isinstance(event, TokenEvent) else []
                done = event if isinstance(event, FinishEvent) else None
            out.append((tokens, done.cached_tokens))
        return out

    try:
        got = asyncio.run(go())
    finally:
        engine.stop()
    assert [cached for _, cached in got] == [0, 5 * BLOCK_TOKENS, 5 * BLOCK_TOKENS, BLOCK_TOKENS]
    assert got[0][0] == got[1][0]


def test_the_slot_plan_reserve_counts_the_prefix_pool(varied_base) -> None:
    from server.app import kv_reserve
    from server.engine.prefix_cache import pool_bytes
    from server.settings import Settings

    def reserve(tokens: int) -> int:
        return kv_reserve(Settings(model="unused", device="cpu", max_batch=4, prefix_cache_tokens=tokens), varied_base)

    cache = KVCache.for_model(varied_base.model.config, 4, varied_base.max_context, torch.device("meta"),
                              varied_base.dtype)
    assert reserve(4096) - reserve(0) == pool_bytes(cache, 4096) > 0
    engine_pool = PrefixCache(KVCache.for_model(varied_base.model.config, 4, 64, torch.device("meta"),
                                                varied_base.dtype), 4096)
    assert engine_pool.reserved_bytes() == pool_bytes(cache, 4096)  # the pool's size does not depend on rows


def test_the_slot_plan_reserve_counts_the_module_copy_budget(varied_base) -> None:
    from server.app import device_reserve, kv_reserve
    from server.settings import Settings

    settings = Settings(model="unused", device="cpu", max_batch=4, module_copy_budget_mb=100)
    assert device_reserve(settings, varied_base) - kv_reserve(settings, varied_base) == 100 * 2**20
