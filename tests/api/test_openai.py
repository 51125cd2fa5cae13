"""The official `openai` client, unchanged, against /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.settings import Settings
from tests.harness import openai_client, running_server


@pytest.fixture(scope="module")
def server(varied_model_dir, tmp_path_factory):
    settings = Settings(model=str(varied_model_dir), store=tmp_path_factory.mktemp("store"), device="cpu",
                        dtype="float32", max_batch=4)
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model_id(varied_model_dir):
    return varied_model_dir.name


def test_models_lists_the_base(client, model_id):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == model_id


def test_completion_plain_and_stream_agree_with_generate(client, server, model_id):
    done = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=12,
                                     temperature=0)
    choice = done.choices[0]
    assert done.object == "text_completion" and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12
    native = httpx.post(f"{server}/generate", json={"prompt": "The capital of France is", "max_new_tokens": 12})
    assert choice.text == native.json()["text"]
    chunks = list(client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_plain_and_stream(client, model_id):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    done = client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 10  # the chat template wrapped the messages
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_chat_uses_the_tokenizers_chat_template(client, server, model_id, varied_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    native = httpx.post(f"{server}/generate", json={"prompt": templated, "max_new_tokens": 8}).json()
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == native["text"]


def test_stop_and_seed(client, model_id):
    full = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=20, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]
    a = client.completions.create(model=model_id, prompt="Hi", max_tokens=12, temperature=1.0, seed=5)
    b = client.completions.create(model=model_id, prompt="Hi", max_tokens=12, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -0.5}, {"top_p": 2.0}, {"n": 5}, {"prompt": ""},
    {"max_tokens": 10**7},
])
def test_bad_requests_are_openai_400s(client, model_id, kwargs):
    args = {"model": model_id, "prompt": "Hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    body = err.value.body
    assert body["message"] and body["type"] and "param" in body and "code" in body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-a-model", prompt="Hi", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-a-model", messages=[{"role": "user", "content": "x"}])


def test_empty_messages_is_400(client, model_id):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[])


CACHED_PROMPT = "Cached preamble: " + " ".join(f"rule {i} says be brief." for i in range(30))  # > 2 cache blocks


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client, server, model_id):
    """prompt_tokens_details.cached_tokens: 0 on a miss; whole 32-token blocks when the prompt was seen."""
    def completion():
        return client.completions.create(model=model_id, prompt=CACHED_PROMPT + " Q1", max_tokens=2, temperature=0)

    miss, hit = completion(), completion()
    assert miss.usage.prompt_tokens_details.cached_tokens == 0
    cached = hit.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 32 == 0 and cached < hit.usage.prompt_tokens == miss.usage.prompt_tokens
    stream = client.completions.create(model=model_id, prompt=CACHED_PROMPT + " Q2", max_tokens=2, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    (final,) = [c for c in stream if c.usage is not None]
    assert final.usage.prompt_tokens_details.cached_tokens == cached  # same preamble, another question

    messages = [{"role": "system", "content": CACHED_PROMPT}, {"role": "user", "content": "Hi"}]
    chat = [client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
            for _ in range(2)]
    assert chat[0].usage.prompt_tokens_details.cached_tokens == 0
    assert chat[1].usage.prompt_tokens_details.cached_tokens >= 64
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    (final,) = [c for c in stream if c.usage is not None]
    assert final.usage.prompt_tokens_details.cached_tokens == chat[1].usage.prompt_tokens_details.cached_tokens

    native = httpx.post(f"{server}/generate", json={"prompt": CACHED_PROMPT + " Q3", "max_new_tokens": 2},
                        timeout=60).json()
    assert native["usage"]["cached_tokens"] == cached
