"""Prompt encoding stays within the context: refused by length before tokenizing, cut at context + 1
tokens, a bounded number at once and off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from server.api.prompts import PromptEncoder, max_token_chars
from server.errors import InvalidRequest
from server.settings import Settings
from tests.harness import running_server

CONTEXT = 128


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = Settings(model=str(tiny_model_dir), store=tmp_path_factory.mktemp("store"), device="cpu",
                        dtype="float32", max_seq_len=CONTEXT, max_new_tokens_limit=64)
    with running_server(settings) as url:
        yield url


def _bodies(prompt: str) -> list[tuple[str, dict]]:
    return [("/generate", {"prompt": prompt, "max_new_tokens": 4}),
            ("/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 4}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": prompt}],
                                      "max_tokens": 4})]


def test_a_megabytes_prompt_is_refused_by_its_length_before_tokenizing(server):
    prompt = "word " * 600_000  # 3 MB: under the 4 MiB body limit, ~600k tokens
    for path, body in _bodies(prompt):
        started = time.monotonic()
        r = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert r.status_code in (400, 422), (path, r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        assert "3000000 characters cannot fit" in message and f"{CONTEXT} tokens" in message, message
        assert time.monotonic() - started < 10  # tokenizing it took seconds and ~0.75 GB


def test_a_prompt_over_the_context_is_cut_at_context_plus_one_tokens(server):
    prompt = "hello " * 1000  # ~1000 tokens, but short enough in characters to be tokenized
    for path, body in _bodies(prompt):
        r = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert r.status_code in (400, 422), (path, r.status_code, r.text[:300])
        assert f"prompt (over {CONTEXT} tokens)" in r.json()["error"]["message"], r.text
    ok = httpx.post(f"{server}/generate", json={"prompt": "hello " * 20, "max_new_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 20


class CountingTokenizer:
    """The real tokenizer, slowed and counted: how many calls run at once (not a stand-in for it)."""

    def __init__(self, real) -> None:
        self.real, self.chat_template = real, real.chat_template
        self.running = self.peak = 0
        self.lock = threading.Lock()

    def get_vocab(self):
        return self.real.get_vocab()

    def apply_chat_template(self, messages, **kw):
        return self.real.apply_chat_template(messages, **kw)

    def __call__(self, text, **kw):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.05)
            return self.real(text, **kw)
        finally:
            with self.lock:
                self.running -= 1


async def test_at_most_workers_prompts_are_tokenized_at_once_off_the_event_loop(tiny_model_dir):
    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    encoder = PromptEncoder(tokenizer, CONTEXT, workers=2, inline_chars=0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tick = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(encoder.encode(f"prompt number {i}") for i in range(8)))
    finally:
        tick.cancel()
        encoder.close()
    assert all(results) and tokenizer.peak == 2
    assert ticks >= 20  # 4 rounds of 50 ms: the loop kept running meanwhile
    assert encoder.max_chars == CONTEXT * max_token_chars(tokenizer)
    with pytest.raises(InvalidRequest, match="cannot fit"):
        await PromptEncoder(tokenizer, CONTEXT, workers=1).encode("x" * (encoder.max_chars + 1))


class ThreadRecordingTokenizer(CountingTokenizer):
    def __call__(self, text, **kw):
        self.threads = getattr(self, "threads", []) + [threading.current_thread()]
        return self.real(text, **kw)


async def test_a_short_prompt_is_tokenized_on_the_event_loop_a_long_one_on_the_pool(tiny_model_dir):
    """A hop to the pool and back costs two GIL hand-offs while the engine thread steps: more than the work."""
    tokenizer = ThreadRecordingTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    encoder = PromptEncoder(tokenizer, CONTEXT, workers=1, inline_chars=64)
    try:
        short = await encoder.encode("a short question")
        chat = await encoder.encode_chat([{"role": "user", "content": "hi"}])
        long = await encoder.encode("word " * 20)
    finally:
        encoder.close()
    here = threading.current_thread()
    assert short and chat and long
    assert tokenizer.threads[:2] == [here, here]
    assert tokenizer.threads[2] is not here and tokenizer.threads[2].name.startswith("loraplex-tokenize")
