"""Penalties, biases and stop controls over real HTTP, each checked against its definition; refusals by name.

The tiny random model repeats one token greedily, which makes each control's
effect visible: its logprobs (from the distribution sampled, see docs/API.md)
show the exact logit arithmetic of each definition while the outputs agree.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.decoding_http import PROMPT, generate, serve, token_ids, top
from tests.harness import openai_client

EOS = 2
X, Y = 665, 1000  # two ordinary tokens, both biased far above the rest in the definition tests


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    yield from serve(tiny_model_dir, tmp_path_factory.mktemp("store"), max_logit_bias=4)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai_client(server)


def _diffs(result) -> list[float]:
    return [top(e)[X] - top(e)[Y] for e in result["logprobs"]]


def test_frequency_penalty_subtracts_penalty_times_count(client):
    both = {str(X): 100, str(Y): 100}
    plain = generate(client, logit_bias=both)
    pen = generate(client, logit_bias=both, frequency_penalty=2.0)
    assert token_ids(plain) == token_ids(pen) == [X] * 12  # same path, so the logits compare step by step
    for count, (a, b) in enumerate(zip(_diffs(plain), _diffs(pen))):
        assert b == pytest.approx(a - 2.0 * count, abs=1e-3)
    # Unbiased: the token greedy repeats is given up once its count outweighs its lead.
    ids = token_ids(generate(client, frequency_penalty=2.0))
    repeated = token_ids(generate(client))[0]
    assert token_ids(generate(client)) == [repeated] * 12 and ids.count(repeated) < 12


def test_presence_penalty_subtracts_once(client):
    both = {str(X): 100, str(Y): 100}
    plain = generate(client, logit_bias=both)
    pen = generate(client, logit_bias=both, presence_penalty=2.0)
    assert token_ids(plain) == token_ids(pen)
    for step, (a, b) in enumerate(zip(_diffs(plain), _diffs(pen))):
        assert b == pytest.approx(a - (2.0 if step else 0.0), abs=1e-3)


def test_repetition_penalty_discourages_prompt_and_output_tokens(client, tiny_model_dir):
    from transformers import AutoTokenizer

    prompt_ids = set(AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT)["input_ids"])
    assert len(set(token_ids(generate(client)))) == 1
    ids = token_ids(generate(client, repetition_penalty=10.0))
    assert len(set(ids)) == len(ids) and not prompt_ids & set(ids)
    # HF definition at the first step: a seen token with a positive logit is divided, not subtracted.
    both = {str(X): 100, str(Y): 100}
    pen = generate(client, logit_bias=both, repetition_penalty=2.0)
    assert token_ids(pen)[:2] == [X, Y]  # X, once seen, loses half its (biased, positive) logit


def test_logit_bias_adds_to_the_logit(client, oai, tiny_model_dir):
    plain = generate(client)
    first = token_ids(plain)[0]
    assert token_ids(generate(client, logit_bias={str(X): 100})) == [X] * 12
    banned = generate(client, logit_bias={str(first): -100})
    assert first not in token_ids(banned)
    done = oai.completions.create(model=tiny_model_dir.name, prompt=PROMPT, max_tokens=5, temperature=0,
                                  logit_bias={str(X): 100})
    assert done.usage.completion_tokens == 5 and done.choices[0].text == " there" * 5


def test_logit_bias_entries_are_bounded(client, oai, tiny_model_dir):
    r = client.post("/generate", json={"prompt": PROMPT, "logit_bias": {str(i): 1 for i in range(5)}})
    assert r.status_code == 422 and "logit_bias: at most 4 entries" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model=tiny_model_dir.name, prompt=PROMPT, max_tokens=2,
                               logit_bias={str(i): 1 for i in range(5)})
    r = client.post("/generate", json={"prompt": PROMPT, "logit_bias": {"999999": 1}})
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]["message"]
    r = client.post("/generate", json={"prompt": PROMPT, "logit_bias": {"the": 1}})
    assert r.status_code == 422 and "logit_bias" in r.json()["error"]["message"]


def test_stop_token_ids_min_tokens_and_ignore_eos(client):
    first = token_ids(generate(client))[0]
    stopped = generate(client, stop_token_ids=[first])
    assert stopped["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    held = generate(client, stop_token_ids=[first], min_tokens=3)
    assert first not in token_ids(held)[:3]
    eos = generate(client, logit_bias={str(EOS): 100})
    assert eos["finish_reason"] == "stop" and eos["usage"]["completion_tokens"] == 1
    kept = generate(client, logit_bias={str(EOS): 100}, ignore_eos=True)
    assert kept["finish_reason"] == "length" and token_ids(kept) == [EOS] * 12
    late = generate(client, logit_bias={str(EOS): 100}, min_tokens=4)
    assert late["usage"]["completion_tokens"] == 5 and EOS not in token_ids(late)[:4]


@pytest.mark.parametrize("field", ["adapters", "max_tokens", "temprature"])
def test_unknown_native_field_is_422_naming_it(client, field):
    r = client.post("/generate", json={"prompt": PROMPT, field: 1})
    assert r.status_code == 422
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("kwargs,name", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"extra_body": {"made_up": 1}}, "made_up"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_openai_chat_refuses_what_it_does_not_implement(oai, tiny_model_dir, kwargs, name):
    with pytest.raises(openai.BadRequestError, match=name):
        oai.chat.completions.create(model=tiny_model_dir.name, messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=2, **kwargs)


@pytest.mark.parametrize("message,name", [
    ({"role": "assistant", "content": "x", "tool_calls": [{"id": "c", "type": "function"}]}, "tool_calls"),
    ({"role": "tool", "content": "x", "tool_call_id": "c"}, "tool_call_id"),
    ({"role": "user", "content": "x", "cache_hint": True}, "cache_hint"),
    ({"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}, "cache_control"),
])
def test_openai_chat_message_fields_are_never_dropped(oai, tiny_model_dir, message, name):
    with pytest.raises(openai.BadRequestError, match=name):
        oai.chat.completions.create(model=tiny_model_dir.name, messages=[message], max_tokens=2)


def test_openai_chat_message_name_reaches_the_template(oai, tiny_model_dir):
    r = oai.chat.completions.create(model=tiny_model_dir.name, max_tokens=2,
                                    messages=[{"role": "user", "content": "hi", "name": "ada"}])
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs,name", [({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of")])
def test_openai_completions_refuse_what_they_do_not_implement(oai, tiny_model_dir, kwargs, name):
    with pytest.raises(openai.BadRequestError, match=name):
        oai.completions.create(model=tiny_model_dir.name, prompt=PROMPT, max_tokens=2, **kwargs)


def test_openai_penalties_change_output(oai, tiny_model_dir):
    args = {"model": tiny_model_dir.name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    plain = oai.completions.create(**args).choices[0].text
    assert oai.completions.create(**args, frequency_penalty=2.0).choices[0].text != plain
    assert oai.completions.create(**args, extra_body={"repetition_penalty": 10.0}).choices[0].text != plain
