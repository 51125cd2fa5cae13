"""/health, /ready, /metrics, draining (503) and shutdown hooks, in-process."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import app_of, cpu_settings, running_server


@pytest.fixture
def settings(varied_model_dir, tmp_path):
    return cpu_settings(varied_model_dir, tmp_path / "store")


def samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def test_health_ready_metrics(settings):
    with running_server(settings) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        for stream in (False, True):
            r = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 5, "stream": stream})
            assert r.status_code == 200
        m = httpx.get(f"{url}/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        values = samples(m.text)
    assert values["loraplex_requests_total{finish_reason=length,route=generate}"] == 2
    assert values["loraplex_generated_tokens_total"] == 10
    assert values["loraplex_prompt_tokens_total"] >= 2
    assert values["loraplex_step_latency_seconds_count"] >= 5
    assert values["loraplex_batch_size_count"] >= 5
    assert values["loraplex_queue_depth"] == 0
    # The live gauges read at scrape time: an idle engine, every KV row free, serving.
    assert values["loraplex_engine_alive"] == 1 and values["loraplex_accepting"] == 1
    assert values["loraplex_kv_rows_free"] == values["loraplex_kv_rows"] == settings.max_batch
    assert values["loraplex_engine_interrupted_steps_total"] == 0  # one tenant: nobody ever preempts
    for name in ("adapter_cache_hits", "adapter_cache_misses", "adapter_cache_evictions"):
        assert any(k.startswith(f"loraplex_{name}") for k in _families(m.text)), name


def _families(text: str) -> list[str]:
    return [f.name for f in text_string_to_metric_families(text)]


def test_two_apps_in_one_process_have_separate_registries(settings, tmp_path):
    other = settings.model_copy(update={"store": tmp_path / "store2"})
    with running_server(settings) as a, running_server(other) as b:
        httpx.post(f"{a}/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert samples(httpx.get(f"{a}/metrics").text)["loraplex_generated_tokens_total"] == 3
        assert samples(httpx.get(f"{b}/metrics").text)["loraplex_generated_tokens_total"] == 0


def test_draining_answers_503_and_shutdown_runs_hooks(settings):
    calls: list[str] = []
    with running_server(settings) as url:
        services = app_of(url).state.services
        services.add_shutdown_hook(lambda: calls.append("first"))
        services.add_shutdown_hook(lambda: 1 / 0)  # a failing hook does not stop the others
        services.add_shutdown_hook(lambda: calls.append("last"))
        services.accepting = False
        r = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200
    assert calls == ["first", "last"]
    assert not services.engine.alive


def test_ready_is_false_when_the_engine_thread_is_dead(settings):
    with running_server(settings) as url:
        engine = app_of(url).state.services.engine
        engine.stop()
        r = httpx.get(f"{url}/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
        gen = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert gen.status_code == 503 and gen.json()["error"]["message"]


def test_metrics_show_a_tenant_only_its_own_series(tiny_model_dir, tmp_path):
    """Adapter ids and traffic are tenants' secrets: bob's scrape names nothing of alice, the admin's all."""
    from tests.api.adapter_http import ADMIN, ALICE, BOB, auth, build_adapter, load_tiny, upload, write_keys

    adapter = build_adapter(load_tiny(tiny_model_dir), "lora_qv", tmp_path / "lora")
    settings = cpu_settings(tiny_model_dir, tmp_path / "store", api_keys=write_keys(tmp_path / "keys.json"))
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert upload(client, "alice-secret-project", adapter).status_code == 201
        for key, adapter_id in ((ALICE, "alice-secret-project"), (BOB, None)):
            r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "adapter_id": adapter_id},
                            headers=auth(key))
            assert r.status_code == 200, r.text
        bob, alice, admin = (client.get("/metrics", headers=auth(k)) for k in (BOB, ALICE, ADMIN))
    assert bob.status_code == alice.status_code == admin.status_code == 200
    assert "alice" not in bob.text and 'tenant="bob"' in bob.text
    assert "alice-secret-project" in alice.text and "bob" not in alice.text
    for tenant_view in (bob.text, alice.text):  # nothing tenant-free that measures others' traffic or load
        names = set(_families(tenant_view))
        own = {n for n in names if "adapter_" in n or n.startswith("loraplex_tenant_")}  # tenant-labelled
        assert names <= {"loraplex_engine_alive", "loraplex_accepting"} | own
        assert "loraplex_requests" not in names and "loraplex_queue_depth" not in names
        assert samples(tenant_view)["loraplex_engine_alive"] == 1
    assert "alice-secret-project" in admin.text and 'tenant="bob"' in admin.text
    assert "loraplex_queue_depth" in admin.text
