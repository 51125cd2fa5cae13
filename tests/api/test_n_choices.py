"""n > 1 over real HTTP: one prefill shared by n sequences, seeds per choice, usage, streaming indices."""

from __future__ import annotations

import httpx
import pytest

from tests.api.decoding_http import PROMPT, serve
from tests.harness import app_of, openai_client, wait_until


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    yield from serve(tiny_model_dir, tmp_path_factory.mktemp("store"), max_batch=6)


@pytest.fixture(scope="module")
def oai(server):
    return openai_client(server)


def _engine(server):
    return app_of(server).state.services.engine


def test_n_choices_are_seeded_distinct_and_share_one_prefill(oai, server, tiny_model_dir):
    from transformers import AutoTokenizer

    prompt_len = len(AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT)["input_ids"])
    args = dict(model=tiny_model_dir.name, prompt=PROMPT, max_tokens=8, temperature=2.0, n=3, seed=11)
    engine = _engine(server)
    before, forks = engine.prompt_tokens, engine.forks
    a = oai.completions.create(**args)
    assert engine.prompt_tokens - before == prompt_len  # prefilled once, not three times
    assert engine.forks - forks == 1
    b = oai.completions.create(**args)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]  # reproducible
    assert len(set(texts)) == 3  # each choice has its own stream
    assert a.usage.prompt_tokens == prompt_len and a.usage.completion_tokens == 24
    alone = oai.completions.create(**{**args, "n": 1})
    assert alone.choices[0].text == texts[0]  # choice i is seeded with seed + i


def test_chat_n_streams_each_choice_with_its_index(oai, tiny_model_dir):
    args = dict(model=tiny_model_dir.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                temperature=2.0, n=2, seed=3)
    done = oai.chat.completions.create(**args)
    chunks = list(oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in done.choices}
    assert set(finishes) == {0, 1}
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens


def test_native_n_and_bounds(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post("/generate", json={"prompt": PROMPT, "n": 2, "max_new_tokens": 4, "temperature": 2.0,
                                      "seed": 5}).json()
        assert [x["index"] for x in r["choices"]] == [0, 1] and r["text"] == r["choices"][0]["text"]
        assert r["usage"]["completion_tokens"] == 8
        too_many = c.post("/generate", json={"prompt": PROMPT, "n": 7})
        assert too_many.status_code == 422 and "n must be between 1 and 6" in too_many.json()["error"]["message"]


def test_n_with_greedy_and_a_grammar_forks_matchers(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post("/generate", json={"prompt": PROMPT, "n": 3, "max_new_tokens": 8, "temperature": 3.0,
                                      "seed": 2, "choice": ["red", "green", "blue"]}).json()
        assert {x["text"] for x in r["choices"]} <= {"red", "green", "blue"}
        assert all(x["finish_reason"] == "stop" for x in r["choices"])


def test_cancelling_an_n_request_frees_every_row(server):
    engine = _engine(server)
    with httpx.Client(base_url=server, timeout=60) as c:
        with c.stream("POST", "/generate", json={"prompt": PROMPT, "n": 4, "max_new_tokens": 400,
                                                 "temperature": 1.0, "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())
    assert wait_until(lambda: engine.cache.free_rows == engine.cache.max_batch and engine.idle(), timeout=30)


def test_forked_rows_continue_exactly_like_the_prefilled_one(varied_model_dir, tmp_path):
    """Greedy n = 3 gives three copies of the n = 1 text: the copied KV rows hold the prompt exactly
    (a model whose output depends on its context, so a wrong copy shows)."""
    long_prompt = PROMPT + " then walked to the window, looked outside, and said that the weather was"
    for url in serve(varied_model_dir, tmp_path / "store", max_batch=4):
        _check_fork(url, long_prompt)


def _check_fork(server: str, long_prompt: str) -> None:
    with httpx.Client(base_url=server, timeout=60) as c:
        one = c.post("/generate", json={"prompt": long_prompt, "max_new_tokens": 12}).json()
        three = c.post("/generate", json={"prompt": long_prompt, "max_new_tokens": 12, "n": 3}).json()
    assert [x["text"] for x in three["choices"]] == [one["text"]] * 3
