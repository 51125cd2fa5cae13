"""Shared helpers for the hardening suite: error assertions, "still serves", leak checks, raw HTTP, RSS.

Every bad-input test ends with `assert_serving(url)`: the refusal must not
have cost the server anything a good request needs. Leak checks read the
engine's and adapter manager's own counters (not timing).
"""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path
from typing import Any

import httpx

from tests.api.adapter_http import raw_request, store_files  # noqa: F401 - re-exported for the suite
from tests.harness import TRAIN_DATA, app_of, wait_until



def services_of(url: str) -> Any:
    return app_of(url).state.services


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    """Status, the JSON error shape, and the words a useful message must contain (case-insensitive)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error["type"], str) and error["type"], error
    message = error["message"]
    assert isinstance(message, str) and message, error
    for w in words:
        assert w.lower() in message.lower(), (w, message)
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    return error


def assert_serving(url: str, headers: dict[str, str] | None = None, adapter_id: str | None = None) -> None:
    """The server is ready and a one-token generation (optionally on an adapter) still succeeds."""
    ready = httpx.get(f"{url}/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    body: dict[str, Any] = {"prompt": "still there?", "max_new_tokens": 1}
    if adapter_id is not None:
        body["adapter_id"] = adapter_id
    r = httpx.post(f"{url}/generate", json=body, headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def assert_engine_clean(services: Any, timeout: float = 30.0) -> None:
    """Nothing left behind: no running/waiting request, every KV row free, no adapter pinned or loading."""
    engine = services.engine

    def clean() -> bool:
        stats = engine.stats()
        idle = stats["running"] == 0 and stats["waiting"] == 0 and stats["free_kv_rows"] == stats["max_batch"]
        manager = services.adapters
        pins = manager.stats()["pinned"] if manager is not None else 0
        loading = manager.stats()["loading"] if manager is not None else 0
        return idle and pins == 0 and loading == 0

    assert wait_until(clean, timeout), (engine.stats(), services.adapters and services.adapters.stats())


def live_engine_requests() -> int:
    """Engine `Request` objects still reachable in this process (a leak check for in-thread servers)."""
    from server.engine.request import Request

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Request))


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text (0.0 when absent): `name{labels}` with every given label matching."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        have = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(have.get(k) == json.dumps(v) for k, v in labels.items()):
            total += float(value)
            found = True
    return total if found else 0.0


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    r = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")



def safetensors_bytes(header: object, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, data."""
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    return struct.pack("<Q", n) + blob + data



def train_body(**kw: Any) -> dict:
    spec: dict[str, Any] = dict(adapter_id="trained", method="lora", rank=4, alpha=8,
                                target_modules=["q_proj", "v_proj"], data=TRAIN_DATA, steps=4,
                                learning_rate=1e-2, batch_size=2, seed=0)
    spec.update(kw)
    return spec
