"""Fixtures of the hardening suite: settings with small limits, PEFT adapters for the tiny model, uploads.

Limits are small on purpose (context 128 tokens, 64 new tokens, 1 MiB
adapters): boundary cases stay cheap on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.api.adapter_http import adapter_files, build_adapter, load_tiny
from tests.harness import cpu_settings, running_server

MiB = 1024 * 1024
CONTEXT = 128  # max_seq_len: the served context in this suite


def hardening_settings(model_dir: Path, store: Path, **overrides) -> Settings:
    kw = dict(max_batch=4, max_queue=8, max_seq_len=CONTEXT, max_new_tokens_limit=64, max_rank=32,
              max_adapter_bytes=MiB, max_adapters_resident=2, train_interleave_steps=1, max_train_steps=200)
    kw.update(overrides)
    return cpu_settings(model_dir, store, **kw)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A server on the suite's settings, one per test module: (base url, store root)."""
    store = tmp_path_factory.mktemp("hardening") / "store"
    with running_server(hardening_settings(tiny_model_dir, store)) as url:
        yield url, store


@pytest.fixture(scope="module")
def url(server: tuple[str, Path]) -> str:
    return server[0]


@pytest.fixture(scope="session")
def peft_adapters(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """PEFT-saved adapters for the tiny model: name -> directory (adapter_config.json + safetensors)."""
    root = tmp_path_factory.mktemp("hardening-adapters")
    base = load_tiny(tiny_model_dir)
    out = {kind: build_adapter(base, kind, root / kind, seed=i + 1, scale=0.5)
           for i, kind in enumerate(("lora_qv", "miss_balance"))}
    out["lora_qv_b"] = build_adapter(base, "lora_qv", root / "lora_qv_b", seed=7, scale=0.5)
    return out


@pytest.fixture
def put_adapter(peft_adapters: dict[str, Path]) -> Callable[..., httpx.Response]:
    """put_adapter(url, adapter_id, kind="lora_qv", headers=None) -> the upload's response."""

    def put(url: str, adapter_id: str, kind: str = "lora_qv", headers: dict | None = None) -> httpx.Response:
        return httpx.put(f"{url}/v1/adapters/{adapter_id}", files=adapter_files(peft_adapters[kind]),
                         headers=headers or {}, timeout=60)

    return put
