"""Observability: request ids, structured JSON logs without prompt text, and Prometheus series that move.

Logs are captured in-process (caplog) and rendered with the server's own
JsonFormatter, so the assertions see exactly the lines `loraplex serve` writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.logging import JsonFormatter
from server.metrics import OTHER_LABEL, Metrics
from tests.hardening.conftest import hardening_settings
from tests.hardening.helpers import metric_value, scrape, train_body
from tests.harness import running_server, wait_job, wait_until

SECRET = "zebra-secret-8841"  # a prompt marker that must never reach the logs by default


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("observe") / "store"
    settings = hardening_settings(tiny_model_dir, store, max_adapters_resident=1, metrics_max_adapter_series=3)
    with running_server(settings) as base_url:
        yield base_url


def json_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records]


# --- request ids -------------------------------------------------------------------------------------

def test_request_id_is_echoed_assigned_and_sanitised(url: str) -> None:
    mine = httpx.get(f"{url}/v1/models", headers={"X-Request-ID": "client-req.42:a"})
    assert mine.headers["x-request-id"] == "client-req.42:a"
    a, b = httpx.get(f"{url}/v1/models"), httpx.get(f"{url}/v1/models")
    assert a.headers["x-request-id"].startswith("req-") and a.headers["x-request-id"] != b.headers["x-request-id"]
    for bad in ("x" * 129, "has space", "semi;colon", "ünïcode".encode()):
        r = httpx.get(f"{url}/v1/models", headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"].startswith("req-"), bad  # never reflected as sent
    # Every answer carries one, including those produced before any route runs.
    for r in (httpx.get(f"{url}/nope"), httpx.post(f"{url}/generate", json={"prompt": ""}),
              httpx.post(f"{url}/generate", json={"prompt": "x"}, headers={"x-pad": "a" * 20_000}),
              httpx.post(f"{url}/generate", content=b"x" * (5 * 1024 * 1024))):
        assert r.status_code >= 400 and r.headers["x-request-id"], r.status_code


# --- structured logs ---------------------------------------------------------------------------------

def test_access_and_generation_lines_are_json_with_the_request_id(url: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    r = httpx.post(f"{url}/generate", json={"prompt": f"hello {SECRET}", "max_new_tokens": 3},
                   headers={"X-Request-ID": "trace-me-1"})
    assert r.status_code == 200
    s = httpx.post(f"{url}/generate", json={"prompt": f"stream {SECRET}", "max_new_tokens": 2, "stream": True},
                   headers={"X-Request-ID": "trace-me-2"})
    assert s.status_code == 200
    assert wait_until(lambda: sum(line.get("logger") == "loraplex.generation" for line in json_lines(caplog)) >= 2)
    lines = json_lines(caplog)
    access = [x for x in lines if x["logger"] == "loraplex.access" and x.get("request_id") == "trace-me-1"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/generate"
    assert access[0]["method"] == "POST" and access[0]["duration_ms"] > 0 and access[0]["tenant"] == "default"
    for rid in ("trace-me-1", "trace-me-2"):
        gen = [x for x in lines if x["logger"] == "loraplex.generation" and x.get("request_id") == rid]
        assert gen, (rid, lines)
        assert gen[0]["generation_id"].startswith("gen-") and gen[0]["completion_tokens"] in (2, 3)
        assert gen[0]["finish_reason"] == "length" and "prompt" not in gen[0]
    assert all({"ts", "level", "logger", "message"} <= set(x) for x in lines)


def test_no_prompt_text_in_logs_by_default(url: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = [
        ("/generate", {"prompt": f"plain {SECRET}", "max_new_tokens": 2}),
        ("/generate", {"prompt": f"too long {SECRET} " + "x " * 400, "max_new_tokens": 2}),  # 422 path
        ("/generate", {"prompt": f"unknown adapter {SECRET}", "adapter_id": "nope"}),  # 404 path
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": SECRET}]}),
        ("/v1/completions", {"model": "m", "prompt": SECRET, "temperature": -1}),  # validation path
        ("/v1/training/jobs", train_body(adapter_id="../x", data=[{"prompt": SECRET, "completion": SECRET}])),
    ]
    for path, body in bodies:
        httpx.post(f"{url}{path}", json=body, timeout=60)
    rendered = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert rendered and SECRET not in rendered


def test_log_prompts_setting_puts_the_prompt_in_the_generation_line(tiny_model_dir, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    settings = hardening_settings(tiny_model_dir, tmp_path / "store", log_prompts=True)
    with running_server(settings) as base_url:
        httpx.post(f"{base_url}/generate", json={"prompt": f"opt-in {SECRET}", "max_new_tokens": 1})
        assert wait_until(lambda: any(x.get("prompt") for x in json_lines(caplog)))
    assert any(SECRET in (x.get("prompt") or "") for x in json_lines(caplog))


# --- metrics ---------------------------------------------------------------------------------------------

def test_per_adapter_cache_engine_and_training_metrics_move(url: str, put_adapter) -> None:
    for name, kind in (("obs-a", "lora_qv"), ("obs-b", "miss_balance")):
        assert put_adapter(url, name, kind).status_code == 201
    before = scrape(url)
    for adapter in ("obs-a", "obs-b", "obs-a", None):  # one device slot: b evicts a, a evicts b
        body = {"prompt": "metrics please", "max_new_tokens": 4, "adapter_id": adapter}
        assert httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 200
    after = scrape(url)

    def moved(name: str, by: float | None = None, **labels: str) -> float:
        delta = metric_value(after, name, **labels) - metric_value(before, name, **labels)
        assert delta > 0 if by is None else delta == by, (name, labels, delta)
        return delta

    moved("loraplex_adapter_requests_total", 2, tenant="default", adapter="obs-a", finish_reason="length")
    moved("loraplex_adapter_requests_total", 1, tenant="default", adapter="obs-b", finish_reason="length")
    moved("loraplex_adapter_requests_total", 1, tenant="default", adapter="_base", finish_reason="length")
    moved("loraplex_adapter_generated_tokens_total", 8, tenant="default", adapter="obs-a")
    moved("loraplex_adapter_prompt_tokens_total", tenant="default", adapter="obs-b")
    moved("loraplex_adapter_request_latency_seconds_count", 2, tenant="default", adapter="obs-a")
    moved("loraplex_adapter_time_to_first_token_seconds_count", 1, tenant="default", adapter="obs-b")
    moved("loraplex_adapter_cache_misses_total", tier="device")
    moved("loraplex_adapter_cache_evictions_total", tier="device")
    moved("loraplex_adapter_cache_hits_total", tier="host")
    moved("loraplex_batch_size_count")
    moved("loraplex_step_latency_seconds_count")
    moved("loraplex_generated_tokens_total", 16)
    for gauge in ("loraplex_queue_depth", "loraplex_running_requests", "loraplex_kv_rows_free",
                  "loraplex_adapter_pins", "loraplex_engine_alive", "process_resident_memory_bytes"):
        assert f"\n{gauge} " in after, gauge
    assert metric_value(after, "loraplex_kv_rows_free") == metric_value(after, "loraplex_kv_rows")
    assert metric_value(after, "loraplex_adapter_pins") == 0 and metric_value(after, "loraplex_engine_alive") == 1


def test_training_progress_metrics(url: str) -> None:
    job = httpx.post(f"{url}/v1/training/jobs", json=train_body(adapter_id="obs-trained", steps=30,
                                                                batch_size=1)).json()
    wait_job(url, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    text = scrape(url)
    assert metric_value(text, "loraplex_training_jobs", status="running") == 1
    assert metric_value(text, "loraplex_training_active_steps") == 30
    assert 1 <= metric_value(text, "loraplex_training_active_step") <= 30
    assert metric_value(text, "loraplex_training_steps_total") > 0
    wait_job(url, job["id"], lambda j: j["status"] == "succeeded")
    text = scrape(url)
    assert metric_value(text, "loraplex_training_jobs", status="succeeded") >= 1
    assert metric_value(text, "loraplex_training_active_steps") == 0


def test_adapter_label_cardinality_is_bounded(url: str, put_adapter) -> None:
    """The module's server allows 3 (tenant, adapter) pairs; later adapters share the `_other` series."""
    for i in range(4):
        assert put_adapter(url, f"card-{i}", "lora_qv").status_code == 201
        httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 1, "adapter_id": f"card-{i}"})
    text = scrape(url)
    pairs = {line.split("{", 1)[1].split("}", 1)[0] for line in text.splitlines()
             if line.startswith("loraplex_adapter_requests_total{")}
    adapters = {dict(p.split("=", 1) for p in pair.split(","))["adapter"] for pair in pairs}
    assert len(adapters - {f'"{OTHER_LABEL}"'}) <= 3 and f'"{OTHER_LABEL}"' in adapters, adapters


def test_adapter_labels_unit() -> None:
    metrics = Metrics(max_adapter_series=2)
    assert metrics.adapter_labels("t", "a") == ("t", "a")
    assert metrics.adapter_labels("t", "b") == ("t", "b")
    assert metrics.adapter_labels("t", "c") == (OTHER_LABEL, OTHER_LABEL)
    assert metrics.adapter_labels("t", "a") == ("t", "a")  # known pairs keep their series
