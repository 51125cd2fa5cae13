"""Structured output over real HTTP: every constrained output parses and validates, whatever the adapter.

Schemas are small and bounded (enums, booleans, one-digit integers, short
arrays) so that the tiny random model finishes them within max_tokens; the
grammar forces the valid structure, the model only picks among what it allows.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.api.adapter_http import build_adapter, load_tiny
from tests.api.decoding_http import PROMPT, serve_with_adapters
from tests.harness import openai_client
from tests.harness import app_of

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["color", "n"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"enum": ["yes", "no", "maybe"]},
]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft-structured")
    base = load_tiny(tiny_model_dir)
    dirs = {"lora": build_adapter(base, "lora_all", out / "lora", seed=5, scale=0.5),
            "miss": build_adapter(base, "miss_balance", out / "miss", seed=6, scale=0.5)}
    yield from serve_with_adapters(tiny_model_dir, tmp_path_factory.mktemp("store"), dirs)


@pytest.fixture(scope="module")
def oai(server):
    return openai_client(server)


def test_schemas_and_adapters_in_one_concurrent_batch(server, oai, tiny_model_dir):
    models = [tiny_model_dir.name, "lora", "miss"]
    jobs = [(schema, model, temperature) for schema in SCHEMAS for model in models for temperature in (0.0, 1.5)]

    def run(job):
        schema, model, temperature = job
        fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
        done = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Answer in JSON."}],
                                           max_tokens=40, temperature=temperature, seed=1, response_format=fmt)
        return schema, done.choices[0]

    engine = app_of(server).state.services.engine
    steps = engine.steps
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    assert engine.steps - steps < len(jobs) * 10  # they shared steps (batched), not one after another
    for schema, choice in results:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_native_json_schema_regex_and_choice(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        def gen(**body):
            r = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 30, **body})
            assert r.status_code == 200, r.text
            return r.json()

        for adapter in (None, "lora", "miss"):
            out = gen(adapter_id=adapter, json_schema=SCHEMAS[1], temperature=1.0, seed=3)
            jsonschema.validate(json.loads(out["text"]), SCHEMAS[1])
            out = gen(adapter_id=adapter, regex=r"[0-9]{3}-[a-c]{2}")
            assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", out["text"]) and out["finish_reason"] == "stop"
            out = gen(adapter_id=adapter, choice=["alpha", "beta", "gamma delta"], temperature=2.0, seed=4)
            assert out["text"] in {"alpha", "beta", "gamma delta"}
        streamed = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 30, "stream": True,
                                             "json_schema": SCHEMAS[0]}).text
        text = "".join(json.loads(line[6:]).get("text", "") for line in streamed.splitlines()
                       if line.startswith("data: {"))
        jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_json_object_is_a_json_object_prefix(oai, tiny_model_dir):
    done = oai.chat.completions.create(model=tiny_model_dir.name, messages=[{"role": "user", "content": "JSON"}],
                                       max_tokens=30, temperature=0, response_format={"type": "json_object"})
    text = done.choices[0].message.content
    assert text.startswith("{")
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_grammars_are_compiled_once(server):
    grammars = app_of(server).state.services.grammars
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}}, "required": ["once"]}
    with httpx.Client(base_url=server, timeout=60) as c:
        before = grammars.compiles
        for _ in range(3):
            assert c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 20, "json_schema": schema}).is_success
    assert grammars.compiles - before == 1


@pytest.mark.parametrize("body,words", [
    ({"json_schema": {"type": "nonsense"}}, ["json_schema", "nonsense"]),
    ({"regex": "(abc"}, ["regex", "parenthesis"]),
    ({"json_schema": {"type": "object"}, "regex": "a"}, ["json_schema", "regex"]),
    ({"choice": []}, ["choice"]),
])
def test_bad_constraints_are_422_naming_the_problem(server, body, words):
    r = httpx.post(f"{server}/generate", json={"prompt": PROMPT, **body})
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_bad_response_format_is_an_openai_400(oai, tiny_model_dir):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="response_format"):
        oai.chat.completions.create(model=tiny_model_dir.name, messages=[{"role": "user", "content": "x"}],
                                    max_tokens=4, response_format=bad)
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        oai.chat.completions.create(model=tiny_model_dir.name, messages=[{"role": "user", "content": "x"}],
                                    max_tokens=4, response_format={"type": "json_schema"})
