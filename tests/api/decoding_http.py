"""Shared by the decoding-feature HTTP tests: a server on the tiny model, and /generate with token ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.harness import cpu_settings, running_server

PROMPT = "The cat sat on the mat and"


def serve(model_dir: Path, store: Path, **overrides: Any) -> Iterator[str]:
    settings = cpu_settings(model_dir, store, **{"max_batch": 8, **overrides})
    with running_server(settings) as url:
        yield url


def serve_with_adapters(model_dir: Path, store: Path, adapters: dict[str, Path]) -> Iterator[str]:
    """`serve`, with each PEFT adapter dir uploaded under its name first."""
    from tests.api.adapter_http import adapter_files

    for url in serve(model_dir, store):
        with httpx.Client(base_url=url, timeout=60) as c:
            for name, path in adapters.items():
                assert c.put(f"/v1/adapters/{name}", files=adapter_files(path)).status_code == 201
        yield url


def generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    """POST /generate (greedy, 12 tokens, logprobs 3 unless given); asserts 200."""
    payload = {"prompt": PROMPT, "max_new_tokens": 12, "logprobs": 3, **body}
    r = client.post("/generate", json=payload)
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(result: dict[str, Any]) -> list[int]:
    return [e["token_id"] for e in result["logprobs"]]


def top(entry: dict[str, Any]) -> dict[int, float]:
    """token id → logprob of one position's alternatives."""
    return {t["token_id"]: t["logprob"] for t in entry["top_logprobs"]}
