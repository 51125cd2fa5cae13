"""The store across process restarts, including a kill -9 in the middle of an upload (subprocess server)."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.adapter_http import ALICE, auth, build_adapter, load_tiny, store_files, upload, write_keys
from tests.harness import spawn_server


@pytest.fixture(scope="module")
def peft_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("peft-durable")
    base = load_tiny(tiny_model_dir)
    return {"v1": build_adapter(base, "lora_qv", out / "v1", seed=1),
            "v2": build_adapter(base, "lora_all", out / "v2", seed=2)}


def serve_args(model_dir: Path, store: Path, keys: Path) -> list[str]:
    return ["--model", str(model_dir), "--store", str(store), "--device", "cpu", "--dtype", "float32",
            "--api-keys", str(keys), "--log-level", "warning"]


def multipart_body(adapter_dir: Path, boundary: str) -> bytes:
    parts = []
    for name, filename in (("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")):
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + (adapter_dir / filename).read_bytes()
                     + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_adapters_survive_restart_and_kill_mid_upload(tiny_model_dir: Path, tmp_path: Path, peft_dirs) -> None:
    store, keys = tmp_path / "store", write_keys(tmp_path / "keys.json")
    args = serve_args(tiny_model_dir, store, keys)
    with spawn_server(args) as (proc, url), httpx.Client(base_url=url, timeout=60) as client:
        first = upload(client, "keeper", peft_dirs["v1"])
        assert first.status_code == 201, first.text
        assert upload(client, "doomed", peft_dirs["v1"]).status_code == 201
        assert client.delete("/v1/adapters/doomed", headers=auth(ALICE)).status_code == 204

        # A slow client streams a re-upload of "keeper"; the server dies mid-way (kill -9).
        boundary = uuid.uuid4().hex
        body = multipart_body(peft_dirs["v2"], boundary)
        host = urlsplit(url)
        sock = socket.create_connection((host.hostname, host.port))
        head = (f"PUT /v1/adapters/keeper HTTP/1.1\r\nHost: {host.netloc}\r\n"
                f"Authorization: Bearer {ALICE}\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
        sock.sendall(head + body[: len(body) * 2 // 3])
        staged = lambda: [f for f in store_files(store) if f.startswith(".tmp/") and "safetensors" in f]  # noqa: E731
        wait_for(lambda: bool(staged()))
        proc.kill()
        proc.wait(timeout=30)
        sock.close()
        assert staged(), "the kill must land while the upload is staged"

    with spawn_server(args) as (proc, url), httpx.Client(base_url=url, timeout=60) as client:
        rec = client.get("/v1/adapters/keeper", headers=auth(ALICE)).json()
        assert rec["version"] == 1 and rec["sha256"] == first.json()["sha256"]
        assert client.get("/v1/adapters/doomed", headers=auth(ALICE)).status_code == 404
        assert [a["id"] for a in client.get("/v1/adapters", headers=auth(ALICE)).json()["data"]] == ["keeper"]
        leftovers = [f for f in store_files(store) if f.startswith((".tmp/", ".trash/"))]
        assert leftovers == []
        # The store is writable again: the interrupted re-upload can simply be retried.
        again = upload(client, "keeper", peft_dirs["v2"])
        assert again.status_code == 201 and again.json()["version"] == 2
        r = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 3}, headers=auth(ALICE))
        assert r.status_code == 200, r.text
