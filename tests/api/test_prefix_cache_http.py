"""Prefix cache over real HTTP with real adapters: a server with the cache answers exactly as one without,
for base and adapters sharing a long system prompt, across a re-upload and a merge; hits show in /metrics.

Both servers run the context-sensitive tiny model (tests/harness.py build_varied_llama) and receive the same
uploads and merges in the same order, so each adapter has the same version on both.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.adapters.types import AdapterKey
from server.app import create_app
from server.engine.prefix_cache import BLOCK_TOKENS
from tests.api.adapter_http import ADMIN, ALICE, auth, build_adapter, load_tiny, upload, write_keys
from tests.harness import app_of, cpu_settings, running_server

SYSTEM = ("You are a careful assistant for a bakery. Answer in one short sentence, politely, and never "
          "invent prices. Opening hours are seven to three on weekdays and eight to noon on Saturdays. "
          "We bake sourdough, rye, croissants, and seasonal fruit tarts; orders over ten items need a day "
          "of notice. Allergens: wheat, milk, eggs, nuts in the tarts. ") * 2
QUESTIONS = ["When do you open on Saturday?", "Do the tarts contain nuts?", "Can I order twenty croissants?"]


@pytest.fixture(scope="module")
def dirs(varied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("prefix-peft")
    base = load_tiny(varied_model_dir)
    return {name: build_adapter(base, "lora_all", out / name, seed=seed, scale=1.0)
            for name, seed in (("a", 1), ("b", 2), ("a2", 7))}


@pytest.fixture(scope="module")
def servers(varied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(with the cache: the default, without: prefix_cache_tokens=0)."""
    with contextlib.ExitStack() as stack:
        urls = []
        for name, tokens in (("warm", None), ("cold", 0)):
            tmp = tmp_path_factory.mktemp(f"prefix-{name}")
            extra = {} if tokens is None else {"prefix_cache_tokens": tokens}
            settings = cpu_settings(varied_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"),
                                    max_adapters_resident=4, max_batch=6, max_merged=1, **extra)
            urls.append(stack.enter_context(running_server(create_app(settings))))
        yield urls[0], urls[1]


def generate(url: str, adapter_id: str | None, question: str) -> dict:
    r = httpx.post(f"{url}/generate", json={"prompt": SYSTEM + question, "adapter_id": adapter_id,
                                            "temperature": 0, "max_new_tokens": 16},
                   headers=auth(ALICE), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def mixed(url: str) -> list[str]:
    """Base and both adapters, every question, all at once (mixed batches)."""
    jobs = [(a, q) for q in QUESTIONS for a in (None, "a", "b")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [r["text"] for r in pool.map(lambda job: generate(url, *job), jobs)]


def cached_metric(url: str, adapter: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=auth(ADMIN)).text
    m = re.search(rf'^loraplex_adapter_prefix_cached_tokens_total{{adapter="{adapter}",tenant="alice"}} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


def test_cached_prefixes_answer_exactly_as_without_across_reupload_and_merge(servers, dirs) -> None:
    warm, cold = servers
    engine = app_of(warm).state.services.engine
    for url in servers:
        with httpx.Client(base_url=url, timeout=120) as c:
            assert upload(c, "a", dirs["a"]).status_code == 201 and upload(c, "b", dirs["b"]).status_code == 201
    expected = mixed(cold)
    assert len(set(expected[:3])) == 3, "base and adapters must differ, or this test proves nothing"
    generate(warm, None, QUESTIONS[0])  # fill the cache for each namespace, then everyone hits
    generate(warm, "a", QUESTIONS[0])
    generate(warm, "b", QUESTIONS[0])
    assert mixed(warm) == expected
    assert cached_metric(warm, "a") >= len(QUESTIONS) * 4 * BLOCK_TOKENS
    assert cached_metric(cold, "a") == 0

    # A re-upload is a new version: a new key, so the first request misses and equals the cold server's.
    for url in servers:
        with httpx.Client(base_url=url, timeout=120) as c:
            assert upload(c, "a", dirs["a2"]).status_code == 201
    v2 = AdapterKey("alice", "a", 2)
    assert generate(warm, "a", QUESTIONS[1])["text"] == generate(cold, "a", QUESTIONS[1])["text"]
    assert engine.prefix_hit_tokens[v2] == 0 and engine.prefix_lookup_tokens[v2] > 0
    assert generate(warm, "a", QUESTIONS[2])["text"] == generate(cold, "a", QUESTIONS[2])["text"]
    assert engine.prefix_hit_tokens[v2] > 0

    # A merged lane computes with other numerics: its own namespace, and the same answers as without.
    for url in servers:
        assert httpx.post(f"{url}/v1/adapters/a/merge", headers=auth(ALICE), timeout=120).status_code == 201
    hits = engine.prefix_hit_tokens[v2]
    for i, q in enumerate(QUESTIONS):
        assert generate(warm, "a", q)["text"] == generate(cold, "a", q)["text"]
        if i == 0:
            assert engine.prefix_hit_tokens[v2] == hits  # the adapter-math KV is not the merged copy's
    assert engine.merged_tokens_by_key[v2] > 0 and engine.prefix_hit_tokens[v2] > hits
