"""Faults inside a running server: disk full during upload, corrupted adapter files at load time, the engine
thread raising. Each ends with the store consistent, health truthful and no request hanging.

Process-level faults (kill -9 during merge) are in test_crashes.py; kill -9
during upload and during training are covered by
tests/api/test_adapters_durability.py and tests/api/test_training_api.py.

Disk full: a real 4 MiB tmpfs mounted as the store when this process may
mount (root, as in CI containers); otherwise ENOSPC is injected at the
OS boundary of the upload writer (its `open`); the test records which as the
user property `disk_full` (shown with `-rA` / in JUnit XML).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hardening.conftest import hardening_settings
from tests.hardening.helpers import (assert_engine_clean, assert_error, assert_serving, metric_value, scrape,
                                     services_of, store_files, train_body)
from tests.harness import gate_engine, running_server, wait_job, wait_until

WEIGHTS = "adapter_model.safetensors"


# --- disk full during upload ----------------------------------------------------------------------------

def _try_mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or os.environ.get("TEST_NO_TMPFS"):  # the env knob exercises the fallback
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


def _fill(path: Path) -> Path:
    """Write zeros until the filesystem says ENOSPC; return the filler file."""
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
    return filler


class _FullDisk:
    """ENOSPC after the first few KiB written through the upload writer's `open` (fallback to tmpfs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import server.api.upload as upload

        self.full = False
        real_open = open

        def fake_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if "w" not in mode or not self.full:
                return f
            real_write = f.write

            def write(data):
                if f.tell() + len(data) > 4096:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(data)

            f.write = write  # type: ignore[method-assign]
            return f

        monkeypatch.setattr(upload, "open", fake_open, raising=False)


@pytest.fixture
def full_disk_server(tiny_model_dir: Path, tmp_path: Path, monkeypatch, request) -> Iterator[tuple[str, Path, object]]:
    mnt = tmp_path / "mnt"
    mounted = _try_mount_tmpfs(mnt, "4m")
    request.node.user_properties.append(("disk_full", "tmpfs" if mounted else "patched-open"))
    store = mnt / "store"
    try:
        with running_server(hardening_settings(tiny_model_dir, store)) as url:
            if mounted:
                yield url, store, lambda: _fill(mnt)
            else:
                disk = _FullDisk(monkeypatch)
                yield url, store, lambda: setattr(disk, "full", True) or None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_upload(full_disk_server, put_adapter) -> None:
    url, store, fill = full_disk_server
    assert put_adapter(url, "roomy", "lora_qv").status_code == 201
    text_v1 = httpx.post(f"{url}/generate", json={"prompt": "Hi", "adapter_id": "roomy", "max_new_tokens": 4}).json()
    before = [f for f in store_files(store)]
    filler = fill()
    r = put_adapter(url, "roomy", "lora_qv_b")
    assert_error(r, 507, "space")
    assert store_files(store) == before  # no staging leftovers, no half version
    assert not (store / ".tmp").exists() or not any((store / ".tmp").iterdir())
    again = httpx.post(f"{url}/generate", json={"prompt": "Hi", "adapter_id": "roomy", "max_new_tokens": 4})
    assert again.json()["text"] == text_v1["text"]  # v1 still served
    assert httpx.get(f"{url}/v1/adapters/roomy").json()["version"] == 1
    assert_serving(url, adapter_id="roomy")
    if filler is not None:  # real tmpfs: free the space, and the same upload goes through
        filler.unlink()
        r = put_adapter(url, "roomy", "lora_qv_b")
        assert r.status_code == 201 and r.json()["version"] == 2, r.text


# --- corrupted adapter files at load time -----------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _nan(path: Path) -> None:
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path)


def _shape(path: Path) -> None:
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, path)


def _config_swapped(path: Path) -> None:
    cfg = path.parent / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "use_dora": True}))


CORRUPTIONS = {"truncated": (_truncate, "size"), "garbage_header": (_garbage_header, "header"),
               "nan_values": (_nan, "NaN"), "wrong_shape": (_shape, "shape"), "config_dora": (_config_swapped, "DoRA"),
               "deleted": (lambda p: p.unlink(), "")}


@pytest.fixture(scope="module")
def corrupt_server(tiny_model_dir: Path, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    store = tmp_path_factory.mktemp("corrupt") / "store"
    # No prefetch: an upload would otherwise leave its validated copy in host memory, and the
    # damaged file would never be read (served from the copy, which is right, but not this path).
    with running_server(hardening_settings(tiny_model_dir, store, prefetch_adapters=False)) as url:
        yield url, store


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_adapter_file_on_disk_at_load_time(corrupt_server, put_adapter, case: str) -> None:
    """Validated at upload, damaged on disk before its first load: a clean 4xx, the rest keeps serving."""
    url, store = corrupt_server
    adapter_id = f"rot-{case.replace('_', '-')}"
    assert put_adapter(url, adapter_id, "lora_qv").status_code == 201
    assert put_adapter(url, "healthy", "miss_balance").status_code == 201
    corrupt, words = CORRUPTIONS[case]
    corrupt(next((store / "default" / adapter_id).glob(f"v*/{WEIGHTS}")))
    for _ in range(2):  # the refusal is stable (cached), never a 5xx
        r = httpx.post(f"{url}/generate", json={"prompt": "Hi", "adapter_id": adapter_id, "max_new_tokens": 2})
        assert r.status_code in (404, 422), r.text
        assert_error(r, r.status_code, words)
    assert_engine_clean(services_of(url))
    assert_serving(url, adapter_id="healthy")
    assert put_adapter(url, adapter_id, "lora_qv").status_code == 201  # a re-upload heals it
    assert_serving(url, adapter_id=adapter_id)


# --- the engine thread raising ------------------------------------------------------------------------

def test_engine_thread_raising_fails_everyone_cleanly_and_ready_tells(tiny_model_dir, tmp_path, put_adapter):
    """The loop itself raises (not one step): in-flight and queued requests end at once with an error,
    /ready turns false with the reason, new work is 503, /health stays up, a running training job is
    requeued at shutdown (resumable), and nothing hangs."""
    settings = hardening_settings(tiny_model_dir, tmp_path / "store", max_batch=2, max_queue=8)
    with running_server(settings) as url:
        services = services_of(url)
        engine = services.engine
        job = httpx.post(f"{url}/v1/training/jobs", json=train_body(steps=150, batch_size=1)).json()
        wait_job(url, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
        gate = gate_engine(engine)
        gate.arm()
        assert gate.entered.wait(10)
        results: dict[int, httpx.Response | str] = {}

        def stream(i: int) -> None:
            with httpx.stream("POST", f"{url}/generate", timeout=60,
                              json={"prompt": f"victim {i}", "max_new_tokens": 60, "stream": True}) as r:
                results[i] = "".join(r.iter_text())

        def plain(i: int) -> None:
            results[i] = httpx.post(f"{url}/generate", json={"prompt": f"victim {i}", "max_new_tokens": 60},
                                    timeout=60)

        threads = [threading.Thread(target=stream if i % 2 else plain, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: engine.stats()["waiting"] == 4)

        def explode(*_a, **_k):
            raise RuntimeError("simulated engine crash")

        engine.scheduler.schedule = explode  # the loop's next pass raises out of _run
        gate.release()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a request hung after the engine died"
        for i, res in results.items():
            if isinstance(res, str):  # SSE: an error event, then [DONE]
                assert '"error"' in res and "engine" in res and res.rstrip().endswith("data: [DONE]"), res
            else:
                assert_error(res, 503, "engine")
        assert not engine.alive and isinstance(engine.error, RuntimeError)
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503 and "engine" in ready.json()["reason"]
        assert httpx.get(f"{url}/health").status_code == 200
        assert_error(httpx.post(f"{url}/generate", json={"prompt": "late", "max_new_tokens": 1}), 503, "engine")
        assert metric_value(scrape(url), "loraplex_engine_alive") == 0
    # Shutdown hooks ran: the interrupted training job is queued again (resumable), not lost or stuck.
    from server.training.jobs import JobStore

    jobs = JobStore(Path(settings.store) / ".training" / "jobs.sqlite3")
    try:
        record = jobs.get(job["id"], None, history=False)
        assert record["status"] == "queued" and record["error"] is None, record
    finally:
        jobs.close()
