"""Logprobs over real HTTP: shapes on every route, streaming, and values against PEFT in a mixed batch.

Tolerance: greedy logprobs equal PEFT's `log_softmax` of the same adapter's
logits within 1e-4 absolute (float32; the engine's batched attention and
adapter math reorder sums, nothing more).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.api.adapter_http import build_adapter, load_tiny
from tests.api.decoding_http import PROMPT, serve_with_adapters, token_ids
from tests.harness import openai_client

ATOL = 1e-4
K = 5


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft-logprobs")
    base = load_tiny(tiny_model_dir)
    return {"lora": build_adapter(base, "lora_all", out / "lora", seed=3, scale=0.5),
            "miss": build_adapter(base, "miss_balance", out / "miss", seed=4, scale=0.5)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, adapter_dirs):
    yield from serve_with_adapters(tiny_model_dir, tmp_path_factory.mktemp("store"), adapter_dirs)


@pytest.fixture(scope="module")
def oai(server):
    return openai_client(server)


def _peft_logprobs(model_dir, adapter_dir, ids: list[int]) -> torch.Tensor:
    """PEFT's log_softmax over the whole sequence: [len(ids), vocab]."""
    from peft import PeftModel

    base = load_tiny(model_dir).model
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_greedy_logprobs_match_peft_in_a_mixed_batch(server, tiny_model_dir, adapter_dirs):
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT)["input_ids"]
    adapters = [None, "lora", "miss", None, "lora", "miss"]
    with httpx.Client(base_url=server, timeout=60) as c, ThreadPoolExecutor(len(adapters)) as pool:
        results = list(pool.map(lambda a: c.post("/generate", json={
            "prompt": PROMPT, "adapter_id": a, "max_new_tokens": 8, "logprobs": K}).json(), adapters))
    assert token_ids(results[1]) != token_ids(results[0])  # the adapter changes the output
    for adapter, result in zip(adapters, results):
        ids = token_ids(result)
        ref = _peft_logprobs(tiny_model_dir, adapter and adapter_dirs[adapter], prompt_ids + ids)
        for step, entry in enumerate(result["logprobs"]):
            row = ref[len(prompt_ids) - 1 + step]  # [vocab]: predicts generated token `step`
            assert entry["logprob"] == pytest.approx(float(row[entry["token_id"]]), abs=ATOL)
            values, alternatives = row.topk(K)
            assert [t["token_id"] for t in entry["top_logprobs"]][:2] == alternatives.tolist()[:2]
            got = torch.tensor([t["logprob"] for t in entry["top_logprobs"]])
            torch.testing.assert_close(got, values, atol=ATOL, rtol=0)


def test_completion_logprobs_shape_and_stream(oai, server, tiny_model_dir):
    args = dict(model="lora", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    done = oai.completions.create(**args)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(alts) <= 3 and max(alts.values()) == pytest.approx(v, abs=ATOL)
               for alts, v in zip(lp.top_logprobs, lp.token_logprobs))
    native = httpx.post(f"{server}/generate", json={"prompt": PROMPT, "adapter_id": "lora", "max_new_tokens": 6,
                                                    "logprobs": 3}).json()
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in native["logprobs"]], abs=ATOL)
    streamed = [c.choices[0].logprobs for c in oai.completions.create(**args, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=ATOL)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    echoed = oai.completions.create(**args, echo=True).choices[0].logprobs
    assert echoed.text_offset[0] == len(PROMPT)


def test_chat_logprobs_shape_and_stream(oai):
    args = dict(model="miss", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6,
                temperature=0, logprobs=True, top_logprobs=2)
    done = oai.chat.completions.create(**args)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens
    for item in content:
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=ATOL)  # greedy took the top
    chunks = list(oai.chat.completions.create(**args, stream=True))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    plain = oai.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_sampled_logprobs_come_from_the_tempered_distribution(server):
    """With temperature t the chosen token's logprob is log_softmax(logits / t); top_k cuts the rest to -9999."""
    body = {"prompt": PROMPT, "max_new_tokens": 4, "logprobs": 3, "seed": 1}
    greedy = httpx.post(f"{server}/generate", json={**body, "max_new_tokens": 1}).json()["logprobs"][0]
    hot = httpx.post(f"{server}/generate", json={**body, "max_new_tokens": 1, "temperature": 50.0}).json()
    entry = hot["logprobs"][0]
    assert entry["logprob"] > greedy["logprob"] - 1e-6 or entry["token_id"] != greedy["token_id"]
    spread = [t["logprob"] for t in entry["top_logprobs"]]
    cold = [t["logprob"] for t in greedy["top_logprobs"]]
    assert spread[0] - spread[1] == pytest.approx((cold[0] - cold[1]) / 50.0, abs=1e-3)
    cut = httpx.post(f"{server}/generate", json={**body, "temperature": 1.0, "top_k": 1}).json()["logprobs"]
    assert all(e["logprob"] == pytest.approx(0.0, abs=1e-6) and e["top_logprobs"][1]["logprob"] == -9999.0
               for e in cut)
