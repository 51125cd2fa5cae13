"""Bad-input matrix over real HTTP: every family answers a clean 4xx that names the reason, and the
server still serves afterwards.

Cases already covered elsewhere are not repeated here: adapter-id paths on
the adapter routes and the common broken uploads (tests/api/test_adapters_api.py),
validator refusals file by file (tests/adapters/peft/test_adapter_refusals.py),
/generate field ranges (tests/api/test_generate.py), training submissions
(tests/api/test_training_api.py). This file adds ids in bodies and on the merge
and job routes, hostile files and configs *through HTTP*, the context boundary,
the OpenAI routes' parameters, limits on every other route, malformed and
mistyped bodies, and unknown routes and methods.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.adapter_http import adapter_files
from tests.hardening.conftest import CONTEXT
from tests.hardening.helpers import (assert_error, assert_serving, raw_request, safetensors_bytes, store_files,
                                     train_body)

K_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
K_B = K_A.replace("lora_A", "lora_B")


# --- ids --------------------------------------------------------------------------------------------

BAD_IDS = {
    "dotdot": "..", "traversal": "../etc/passwd", "encoded_dotdot": "%2e%2e", "slash": "a/b", "nul": "a\x00b",
    "cyrillic_a": "\u0430dapter", "fullwidth_a": "\uff41dapter", "greek_o": "l\u03bfra", "65_chars": "a" * 65,
    "upper": "Adapter", "absolute": "/etc/passwd", "backslash": "a\\b", "space": "a b", "empty_after_trim": " ",
}
ID_ROUTES = {
    "generate": ("/generate", lambda i: {"prompt": "x", "adapter_id": i, "max_new_tokens": 1}, 422),
    "completions": ("/v1/completions", lambda i: {"prompt": "x", "model": i, "max_tokens": 1}, 400),
    "chat": ("/v1/chat/completions", lambda i: {"messages": [{"role": "user", "content": "x"}], "model": i}, 400),
    "training": ("/v1/training/jobs", lambda i: train_body(adapter_id=i), 422),
}


@pytest.mark.parametrize("route", list(ID_ROUTES))
@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_ids_in_bodies(server, route: str, case: str) -> None:
    url, store = server
    path, body, status = ID_ROUTES[route]
    before = store_files(store)
    r = httpx.post(f"{url}{path}", json=body(BAD_IDS[case]), timeout=30)
    assert_error(r, status, "invalid adapter id")
    assert store_files(store) == before
    assert_serving(url)


BAD_ID_SEGMENTS = ["%2e%2e", "..%2f..", "a%00b", "%D0%B0dapter", "%EF%BD%81", "a" * 65, "UP", "%20"]


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("segment", BAD_ID_SEGMENTS)
def test_bad_ids_on_the_merge_route(server, segment: str, method: str) -> None:
    url, store = server
    before = store_files(store)
    status, body = raw_request(url, method, f"/v1/adapters/{segment}/merge")
    assert status == 422, (status, body)
    assert "invalid adapter id" in body["error"]["message"]
    assert store_files(store) == before
    assert_serving(url)


@pytest.mark.parametrize("path, status, words", [
    ("/v1/training/jobs/..%2f..%2fjobs.sqlite3", 404, "not found"),
    ("/v1/training/jobs/%00", 404, "not found"),
    ("/v1/training/jobs/" + "j" * 5000, 404, "not found"),
    ("/v1/training/jobs/no-such-job", 404, "not found"),
])
def test_bad_job_ids(url: str, path: str, status: int, words: str) -> None:
    got, body = raw_request(url, "GET", path)
    assert got == status and words in body["error"]["message"].lower(), (got, body)
    cancel, body = raw_request(url, "POST", path + "/cancel")
    assert cancel == 404 and "error" in body, (cancel, body)
    assert_serving(url)


# --- hostile weights and configs, through HTTP -------------------------------------------------------

HOSTILE_WEIGHTS = {
    "header_length_past_end": (dict(header={K_A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                    data=b"\0" * 4, header_len=10**6), "header length"),
    "1gb_declared_header": (dict(header={}, header_len=2**30), "header length"),
    "overlapping_offsets": (dict(header={K_A: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         K_B: {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                 data=b"\0" * 12), "overlaps"),
    "out_of_range_offsets": (dict(header={K_A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                  data=b"\0" * 8), "inconsistent"),
    "undeclared_dtype": (dict(header={K_A: {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}},
                              data=b"\0" * 16), "unknown dtype 'Q4_K'"),
    "offsets_not_matching_shape": (dict(header={K_A: {"dtype": "F32", "shape": [2**31, 2**31],
                                                      "data_offsets": [0, 8]}}, data=b"\0" * 8), "shape"),
}


@pytest.mark.parametrize("case", list(HOSTILE_WEIGHTS))
def test_hostile_safetensors_uploads(server, peft_adapters, case: str) -> None:
    url, store = server
    spec, words = HOSTILE_WEIGHTS[case]
    files = adapter_files(peft_adapters["lora_qv"])
    files["weights"] = ("adapter_model.safetensors", safetensors_bytes(**spec), "application/octet-stream")
    before = store_files(store)
    r = httpx.put(f"{url}/v1/adapters/hostile-{case.replace('_', '-')}", files=files, timeout=30)
    assert_error(r, 422, words)
    assert store_files(store) == before
    assert_serving(url)


HOSTILE_CONFIGS = {
    "auto_map": ({"auto_map": {"AutoModel": "evil.Model"}}, "remote code ('auto_map')"),
    "tokenizer_trust_remote_code": ({"tokenizer_kwargs": {"trust_remote_code": True}},
                                    "remote code ('trust_remote_code')"),
    "dora": ({"use_dora": True}, "DoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "rank_0": ({"r": 0}, "r=0"),
    "rank_100000": ({"r": 100000}, "r=100000"),
    "negative_alpha": ({"lora_alpha": -16}, "negative"),
    "base_model_elsewhere_by_path": ({"base_model_name_or_path": "../../../etc"}, None),  # informational only
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_hostile_config_uploads(server, peft_adapters, case: str) -> None:
    url, store = server
    changes, words = HOSTILE_CONFIGS[case]
    src = peft_adapters["lora_qv"]
    cfg = {**json.loads((src / "adapter_config.json").read_text()), **changes}
    files = adapter_files(src)
    files["config"] = ("adapter_config.json", json.dumps(cfg).encode(), "application/json")
    adapter_id = f"cfg-{case.replace('_', '-')}"
    before = store_files(store)
    r = httpx.put(f"{url}/v1/adapters/{adapter_id}", files=files, timeout=30)
    if words is None:  # a path-like base_model_name_or_path is metadata: accepted, never opened
        assert r.status_code == 201, r.text
        assert_serving(url, adapter_id=adapter_id)
        assert httpx.delete(f"{url}/v1/adapters/{adapter_id}").status_code == 204
        return
    assert_error(r, 422, words)
    assert store_files(store) == before
    assert_serving(url)


# --- generation parameters ---------------------------------------------------------------------------

def _filler(n_tokens: int) -> str:
    return " hello" * n_tokens  # one SmolLM2 token each; no BOS is added


@pytest.mark.parametrize("route", ["generate", "completions"])
def test_prompt_at_the_context_limit_and_one_past(url: str, route: str) -> None:
    path, length = ("/generate", "max_new_tokens") if route == "generate" else ("/v1/completions", "max_tokens")
    body = {"prompt": _filler(CONTEXT - 1), length: 1}
    if route == "completions":
        body["model"] = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    ok = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert ok.status_code == 200, ok.text
    usage = ok.json()["usage"]
    assert usage["prompt_tokens"] == CONTEXT - 1 and usage["completion_tokens"] == 1
    over = httpx.post(f"{url}{path}", json={**body, "prompt": _filler(CONTEXT)}, timeout=60)
    assert_error(over, 422 if route == "generate" else 400, f"context of {CONTEXT} tokens")
    assert_serving(url)


OPENAI_CASES = {
    "n_over_batch": ({"n": 5}, "n"),
    "n_huge": ({"n": 10**9}, "n"),
    "max_tokens_0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens_negative": ({"max_tokens": -1}, "max_tokens"),
    "max_tokens_1e9": ({"max_tokens": 10**9}, "max_tokens"),
    "temperature_negative": ({"temperature": -0.5}, "temperature"),
    "temperature_over_2": ({"temperature": 2.5}, "temperature"),
    "top_p_0": ({"top_p": 0}, "top_p"),
    "stop_huge_list": ({"stop": ["a"] * 10_000}, "stop"),
    "stop_huge_string": ({"stop": "x" * 100_000}, "stop"),
    "stop_empty": ({"stop": [""]}, "stop"),
    "seed_negative": ({"seed": -1}, "seed"),
    "stream_not_bool": ({"stream": "maybe"}, "stream"),
}


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("case", list(OPENAI_CASES))
def test_openai_parameters(url: str, route: str, case: str) -> None:
    change, words = OPENAI_CASES[case]
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    if route == "completions":
        path, body = "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}
    else:
        path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 1}
    error = assert_error(httpx.post(f"{url}{path}", json={**body, **change}, timeout=30), 400, words)
    assert set(error) >= {"message", "type", "param", "code"}  # OpenAI's error shape
    assert_serving(url)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "x", "model": "m", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "model": "m", "temperature": -Infinity}', "temperature"),
    (b'{"prompt": "x", "model": "m", "max_new_tokens": 1e400, "max_tokens": 1e400}', "finite"),
    (b'{"prompt": "x", "model": "m", "max_new_tokens": 1.5, "max_tokens": 1.5}', "integer"),
])
def test_non_finite_and_fractional_numbers(url: str, route: str, raw: bytes, words: str) -> None:
    r = httpx.post(f"{url}{route}", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 422 if route == "/generate" else 400, words)
    assert_serving(url)


# --- bodies: limits, malformed JSON, content types ---------------------------------------------------

JSON_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/training/jobs"]


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_body_and_header_limits_on_every_json_route(url: str, path: str) -> None:
    big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert_error(httpx.post(f"{url}{path}", content=big, headers={"content-type": "application/json"},
                            timeout=60), 413, "exceeds")
    assert_error(httpx.post(f"{url}{path}", json={}, headers={"x-pad": "a" * 20_000}), 431, "headers exceed")
    many = {f"x-h{i}": "a" * 100 for i in range(200)}  # many small headers add up too
    assert_error(httpx.post(f"{url}{path}", json={}, headers=many), 431, "headers exceed")
    assert_error(httpx.get(f"{url}/v1/adapters", headers={"x-pad": "a" * 20_000}), 431, "headers exceed")
    assert_serving(url)


MALFORMED = {
    "truncated": (b'{"prompt": ', "not valid JSON"),
    "trailing_garbage": (b'{"prompt": "x"} x', "not valid JSON"),
    "not_utf8": (b'\xff\xfe{"prompt": "x"}', "UTF-8"),
    "deeply_nested": (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    "array": (b"[1, 2]", "body"),
    "empty": (b"", "body"),
    "null": (b"null", "body"),
    "single_quotes": (b"{'prompt': 'x'}", "not valid JSON"),
}


@pytest.mark.parametrize("path", ["/generate", *JSON_ROUTES])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_json(url: str, path: str, case: str) -> None:
    raw, words = MALFORMED[case]
    r = httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 400 if path.startswith("/v1/c") else 422, words)
    assert_serving(url)


@pytest.mark.parametrize("path", ["/generate", *JSON_ROUTES])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml",
                                          None])
def test_wrong_content_type(url: str, path: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{url}{path}", content=b'{"prompt": "x", "max_new_tokens": 1}', headers=headers, timeout=30)
    assert_error(r, 400 if path.startswith("/v1/c") else 422, "Content-Type: application/json")
    assert_serving(url)


@pytest.mark.parametrize("content_type, body, words", [
    ("application/json", b'{"config": {}}', "multipart"),
    ("multipart/form-data", b"--x\r\n", "multipart"),  # no boundary at all
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--\r\n", ""),
])
def test_upload_with_wrong_or_broken_content_type(server, content_type: str, body: bytes, words: str) -> None:
    url, store = server
    before = store_files(store)
    r = httpx.put(f"{url}/v1/adapters/ctype-case", content=body, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert_error(r, r.status_code, words)
    assert store_files(store) == before
    assert_serving(url)


# --- unknown routes and methods ------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nope", 404), ("POST", "/v1/nope", 404), ("GET", "/v1/training/nope", 404),
    ("GET", "/generate/extra", 404), ("GET", "/%00", 404), ("GET", "/" + "x" * 4000, 404),
    ("GET", "/generate", 405), ("PUT", "/generate", 405), ("DELETE", "/v1/models", 405),
    ("PUT", "/v1/training/jobs", 405), ("PATCH", "/health", 405), ("DELETE", "/ready", 405),
    ("TRACE", "/generate", 405), ("GET", "/v1/completions", 405), ("POST", "/metrics", 405),
    ("GET", "/v1/training/jobs/x/cancel", 405),
])
def test_unknown_routes_and_methods_are_json(url: str, method: str, path: str, status: int) -> None:
    got, body = raw_request(url, method, path)
    assert got == status, (got, body)
    assert body["error"]["type"] == {404: "not_found", 405: "method_not_allowed"}[status]
    assert body["error"]["message"]
    assert_serving(url)


def test_training_bad_inputs_not_covered_elsewhere(url: str) -> None:
    """NaN numbers, over-long Idempotency-Key, malformed JSONL uploads: 422, no job created."""
    def count() -> int:
        return len(httpx.get(f"{url}/v1/training/jobs").json()["data"])

    before = count()
    raw = json.dumps(train_body()).replace('"learning_rate": 0.01', '"learning_rate": NaN').encode()
    assert_error(httpx.post(f"{url}/v1/training/jobs", content=raw, headers={"content-type": "application/json"}),
                 422, "learning_rate")
    assert_error(httpx.post(f"{url}/v1/training/jobs", json=train_body(),
                            headers={"Idempotency-Key": "k" * 300}), 422, "Idempotency-Key")
    spec = json.dumps({k: v for k, v in train_body().items() if k != "data"})
    for data, words in [(b"\xff\xfe", "UTF-8"), (b'{"prompt": "a"', "line 1"), (b"[1]\n", "line 1"),
                        (b'{"prompt": "a", "completion": "b", "evil": 1}\n', "evil")]:
        r = httpx.post(f"{url}/v1/training/jobs/upload", data={"spec": spec},
                       files={"data": ("d.jsonl", data, "application/jsonl")})
        assert_error(r, 422, words)
    r = httpx.post(f"{url}/v1/training/jobs/upload", content=b"not multipart",
                   headers={"content-type": "text/plain"})
    assert_error(r, 422, "multipart")
    assert count() == before
    assert_serving(url)
