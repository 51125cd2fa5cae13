"""`loraplex serve` as a real process: SIGTERM drain, flag checks, the embedded default model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.harness import REPO_ROOT, read_log, serve_command, spawn_server


def stream_generate(url: str, out: dict, max_new_tokens: int) -> None:
    deltas, final = [], None
    with httpx.stream("POST", f"{url}/generate", timeout=120,
                      json={"prompt": "Count with me: one, two, three,", "max_new_tokens": max_new_tokens,
                            "stream": True}) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "text" in event:
                deltas.append(event["text"])
                out["started"].set()
            else:
                final = event
    out["final"], out["text"] = final, "".join(deltas)


def test_sigterm_drains_in_flight_requests_and_exits_0(varied_model_dir, tmp_path):
    args = ["--model", str(varied_model_dir), "--store", str(tmp_path / "store"), "--device", "cpu", "--dtype", "float32",
            "--max-batch", "4"]
    with spawn_server(args) as (proc, url):
        results = [{"started": threading.Event()} for _ in range(2)]
        threads = [threading.Thread(target=stream_generate, args=(url, r, 450)) for r in results]
        for t in threads:
            t.start()
        assert all(r["started"].wait(60) for r in results)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        # Still draining: alive, not ready, refusing new work with 503 + Retry-After.
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = httpx.post(f"{url}/generate", json={"prompt": "late", "max_new_tokens": 2})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0, read_log(proc)[-3000:]
    for r in results:
        assert r["status"] == 200
        assert r["final"]["finish_reason"] == "length" and r["final"]["usage"]["completion_tokens"] == 450


def test_non_loopback_host_without_auth_is_refused(varied_model_dir):
    done = subprocess.run(serve_command(["--model", str(varied_model_dir), "--host", "0.0.0.0"]), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "non-loopback" in done.stderr and "--insecure-no-auth" in done.stderr


def test_bad_flag_values_are_clean_errors():
    done = subprocess.run(serve_command(["--max-batch", "0"]), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "max_batch" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(serve_command(["--max-adapters-resident", "many"]), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "max_adapters_resident: Value error, must be a positive integer or 'auto'" in done.stderr


def test_env_twins_and_flags(varied_model_dir, tmp_path):
    """LORAPLEX_* env configures the server; a flag overrides its env twin."""
    env = {"LORAPLEX_MAX_BATCH": "3", "LORAPLEX_MAX_QUEUE": "5", "LORAPLEX_DEVICE": "cpu", "LORAPLEX_CPU_THREADS": "1"}
    with spawn_server(["--model", str(varied_model_dir), "--store", str(tmp_path / "s"), "--max-queue", "7"],
                      env=env) as (proc, url):
        r = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    log = read_log(proc)
    assert "max_batch=3" in log and "max_queue=7" in log and "cpu_threads=1" in log
    assert "adapter device slots: 3 per adapted module (auto" in log, "auto slots follow max_batch, logged"


@pytest.mark.slow
def test_serve_without_model_loads_the_embedded_default_from_its_cache(embedded_model_dir, tmp_path):
    """`make serve` equivalent; the GGUF was converted once already (the fixture), so this start reads the
    safetensors cache and converts nothing (start-up time itself is a bench figure, not a test)."""
    with spawn_server(["--store", str(tmp_path / "store")], startup_timeout=120) as (proc, url):
        assert httpx.get(f"{url}/ready").json()["model"] == "SmolLM2-135M-Instruct"
        models = httpx.get(f"{url}/v1/models").json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
                             "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip()
        log = read_log(proc)
    assert "loaded SmolLM2-135M-Instruct" in log and "converting embedded GGUF" not in log, log[-2000:]


def test_client_subcommands_are_delegated():
    done = subprocess.run([sys.executable, "-m", "server.cli", "jobs", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "usage: loraplex jobs" in done.stdout  # the client's own parser answered


def test_a_second_server_on_one_store_is_refused_and_kill_9_leaves_no_stale_lock(tiny_model_dir, tmp_path):
    """Two servers on one store would sweep each other's uploads and re-claim each other's jobs.

    The lock is an flock: the kernel drops it when its process dies, so after kill -9 of the holder
    a new server starts at once, with no stale-lock clean-up.
    """
    store = tmp_path / "store"
    args = ["--model", str(tiny_model_dir), "--store", str(store), "--device", "cpu", "--dtype", "float32"]
    with spawn_server(args) as (first, url):
        inflight = store / ".tmp" / "upload-in-flight"
        inflight.mkdir()  # what a second server's start-up sweep would have deleted
        second = subprocess.run(serve_command([*args, "--port", "0"]), cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use" in lines[0], second.stderr
        assert inflight.is_dir() and httpx.get(f"{url}/ready").status_code == 200
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with spawn_server(args) as (third, url):
        assert httpx.get(f"{url}/ready").status_code == 200
        assert (store / ".lock").read_text().strip() == str(third.pid)


def test_quantize_flag_refusals_are_one_line_errors(capsys) -> None:
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--quantize", "int3"])
    assert e.value.code == 2 and "argument --quantize: invalid choice: 'int3'" in capsys.readouterr().err
    assert main(["serve", "--quantize", "int4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "quantize=int4 runs on CUDA only" in err and "Traceback" not in err


def test_replicas_flag_and_env_twin_choose_the_cluster_and_one_process_never_imports_ray(monkeypatch):
    from server.cli import build_parser
    from server.settings import Settings

    args = vars(build_parser().parse_args(["serve", "--replicas", "3", "--ray-address", "10.0.0.1:6379"]))
    assert (args["replicas"], args["ray_address"]) == (3, "10.0.0.1:6379")
    monkeypatch.setenv("LORAPLEX_REPLICAS", "2")
    assert Settings().replicas == 2 and Settings().clustered
    monkeypatch.delenv("LORAPLEX_REPLICAS")
    assert not Settings().clustered and Settings(ray_address="auto").clustered
    done = subprocess.run([sys.executable, "-c", "import sys, server.cli, server.app; "
                           "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('server.cluster')))"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    done = subprocess.run(serve_command(["--replicas", "0"]), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "replicas" in done.stderr and "Traceback" not in done.stderr
