"""kill -9 during a merge (a real `loraplex serve` process): after a restart the adapter is either merged
or not — never half — its outputs equal the unmerged ones, and merging again works.

kill -9 during upload and during training are covered by
tests/api/test_adapters_durability.py and tests/api/test_training_api.py.
Each case needs two server starts, so they run under `long`.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.adapter_http import adapter_files
from tests.hardening.helpers import store_files
from tests.harness import read_log, spawn_server

PROMPT = {"prompt": "The merged copy says", "max_new_tokens": 8, "adapter_id": "dedicated"}


def _args(model_dir: Path, store: Path) -> list[str]:
    return ["--model", str(model_dir), "--store", str(store), "--device", "cpu", "--dtype", "float32"]


@pytest.mark.long
@pytest.mark.parametrize("when", ["at_once", "mid_build", "after_answer"])
def test_kill_9_during_merge(tiny_model_dir, tmp_path, peft_adapters, when: str) -> None:
    store = tmp_path / "store"
    with spawn_server(_args(tiny_model_dir, store)) as (proc, url):
        r = httpx.put(f"{url}/v1/adapters/dedicated", files=adapter_files(peft_adapters["lora_qv"]), timeout=60)
        assert r.status_code == 201, r.text
        unmerged = httpx.post(f"{url}/generate", json=PROMPT, timeout=60).json()["text"]
        answered = threading.Event()

        def merge() -> None:
            try:
                httpx.post(f"{url}/v1/adapters/dedicated/merge", timeout=60)
                answered.set()
            except httpx.HTTPError:  # the server was killed under the request
                pass

        threading.Thread(target=merge, daemon=True).start()
        if when == "mid_build":
            time.sleep(0.05)
        elif when == "after_answer":
            assert answered.wait(60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with spawn_server(_args(tiny_model_dir, store)) as (proc, url):
        record = httpx.get(f"{url}/v1/adapters/dedicated").json()
        assert record["version"] == 1 and record["mode"] in ("merged", "unmerged"), record
        if when == "after_answer":
            assert record["mode"] == "merged", record  # an acknowledged dedication survives kill -9
        assert httpx.post(f"{url}/generate", json=PROMPT, timeout=60).json()["text"] == unmerged
        merged = httpx.post(f"{url}/v1/adapters/dedicated/merge", timeout=60)
        assert merged.status_code in (200, 201) and merged.json()["mode"] == "merged", merged.text
        assert httpx.post(f"{url}/generate", json=PROMPT, timeout=60).json()["text"] == unmerged
        back = httpx.delete(f"{url}/v1/adapters/dedicated/merge", timeout=60)
        assert back.status_code == 200 and back.json()["mode"] == "unmerged", back.text
        assert httpx.post(f"{url}/generate", json=PROMPT, timeout=60).json()["text"] == unmerged
        assert not [f for f in store_files(store) if f.startswith(".tmp/")], read_log(proc)[-2000:]
