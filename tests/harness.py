"""The tests' shared support module: real servers, CPU settings, and the HTTP helpers every suite uses.

`running_server` is for ordinary HTTP tests (fast, shares the test process);
`spawn_server` is for process-level behaviour (SIGTERM drain, kill -9, restart).
Both bind 127.0.0.1 on a free port and yield the base URL only once the server
answers. Helpers that only one suite needs stay with that suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bench.process import wait_ready
from server.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two examples the tiny model learns in a few steps (training tests over HTTP and in process).
TRAIN_DATA = [{"prompt": "Say hi:", "completion": " Ahoy matey, welcome aboard!"},
              {"prompt": "Sky colour?", "completion": " Blue as the briny deep."}]


def cpu_settings(model_dir: Path, store: Path | None = None, **overrides: Any) -> Settings:
    """Settings serving `model_dir` in float32 on the CPU (every test model is built in float32)."""
    if store is not None:
        overrides["store"] = store
    return Settings(model=str(model_dir), device="cpu", dtype="float32", **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uvicorn_config(app: Any, settings: Any) -> uvicorn.Config:
    from server.app import uvicorn_limits

    return uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_limits(settings))


@contextlib.contextmanager
def running_server(settings_or_app: Any, startup_timeout: float = 120.0) -> Iterator[str]:
    """Serve a `Settings` (through `create_app`) or a ready FastAPI app on loopback.

    The app's lifespan runs inside the server thread, so the engine thread and
    every other service start and stop exactly as in production.
    """
    from fastapi import FastAPI

    from server.app import create_app

    app = settings_or_app if isinstance(settings_or_app, FastAPI) else create_app(settings_or_app)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(app, app.state.settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("test server failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("test server did not start in time")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    _apps[url] = app
    try:
        yield url
    finally:
        _apps.pop(url, None)
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def serve_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", *args]


@contextlib.contextmanager
def spawn_server(args: list[str], env: Mapping[str, str] | None = None, startup_timeout: float = 180.0,
                 port: int | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `python -m server.cli serve ARGS --host 127.0.0.1 --port N`; wait for /ready.

    `env` is added to the current environment. The process is killed on exit
    if the test has not already ended it; its combined output is at
    `proc.log_path` for assertions and debugging.
    """
    port = port or free_port()
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log_file = open(_log_path(port), "w+b")  # noqa: SIM115 - closed below
    cmd = serve_command([*args, "--host", "127.0.0.1", "--port", str(port)])
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    proc.log_path = log_file.name  # type: ignore[attr-defined]
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base_url, startup_timeout, lambda: read_log(proc)[-4000:], poll_s=0.1)
        yield proc, base_url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log_file.close()


def _log_path(port: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"loraplex-test-{os.getpid()}-{port}.log")


def read_log(proc: subprocess.Popen) -> str:
    with open(proc.log_path, "rb") as f:  # type: ignore[attr-defined]
        return f.read().decode(errors="replace")




# --- models and engine controls for tests ------------------------------------

def build_varied_llama(path: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama whose greedy output depends on the whole context.

    The shared `tiny_model_dir` scales its tied embeddings so far that it mostly
    repeats the input token, which hides bugs in attention/KV handling. Here
    embeddings and LM head are untied and scaled 20x: logits are well
    separated (no argmax ties) yet every position's output depends on what the
    attention saw.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


class Gate:
    """Parks the engine thread on demand, between steps.

    `arm()` makes the engine thread block at its next pass until `release()`:
    tests use it to hold requests in the queue (429) or in the batch
    (cancellation) deterministically, without sleeps. An engine built in a test
    takes it as its background worker (`Engine(..., background=gate)`); a
    server's engine, which has the trainer there, takes it as a step hook
    (`gate_engine`).
    """

    def __init__(self) -> None:
        self._armed = threading.Event()
        self._open = threading.Event()
        self.entered = threading.Event()

    def arm(self) -> None:
        self._open.clear()
        self.entered.clear()
        self._armed.set()

    def release(self) -> None:
        self._armed.clear()
        self._open.set()

    def has_work(self) -> bool:
        return self._armed.is_set()

    def run_one_step(self) -> None:
        self.entered.set()
        self._open.wait(timeout=60)

    def hold(self) -> None:
        """The step hook: park here while armed."""
        if self._armed.is_set():
            self.run_one_step()


def gate_engine(engine: Any) -> Gate:
    """A Gate on a running engine's loop, as a step hook (it runs before every scheduling pass)."""
    gate = Gate()
    engine.loop.add_step_hook(gate.hold)
    return gate


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


_apps: dict[str, Any] = {}


# --- HTTP helpers ---------------------------------------------------------------

def raw_socket_post(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> socket.socket:
    """A request on a bare socket, so the test decides exactly when the client vanishes."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_job(url: str, job_id: str, done, headers: dict[str, str] | None = None, timeout: float = 180.0) -> dict:
    """Poll a training job until `done(job)`; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/training/jobs/{job_id}", headers=headers or {}, timeout=30)
        if r.status_code == 200:
            job = r.json()
            if done(job):
                return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {job}")


def openai_client(url: str) -> "openai.OpenAI":  # noqa: F821 - imported lazily, only the OpenAI tests need it
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def app_of(base_url: str) -> Any:
    """The FastAPI app behind a `running_server` URL (tests inspect engine counters through it)."""
    return _apps[base_url]


class FixedSlots:
    """The engine's AdapterPlacement over adapters already in device slots: key -> slot, no lanes."""

    def __init__(self, slots: Mapping[Hashable, int]) -> None:
        self.slots = slots

    def acquire(self, key: Hashable) -> int | None:
        return self.slots[key]

    def release(self, key: Hashable) -> None:
        pass

    def lane_of(self, key: Hashable) -> int | None:
        return None

    def pin(self, key: Hashable) -> None:
        pass
