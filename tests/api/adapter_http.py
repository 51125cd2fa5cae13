"""Helpers for the adapter HTTP tests: PEFT-saved adapters for the tiny model, uploads, store walks."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import torch

from tests.adapters.adapter_factory import make_peft

KEYS = {
    "alice-key-0001": {"tenant": "alice"},
    "bob-key-000001": {"tenant": "bob"},
    "root-key-00001": {"tenant": "ops", "admin": True},
}
ALICE, BOB, ADMIN = "alice-key-0001", "bob-key-000001", "root-key-00001"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_keys(path: Path) -> Path:
    path.write_text(json.dumps(KEYS))
    return path


def load_tiny(model_dir: Path) -> SimpleNamespace:
    """The tiny model exactly as the server loads it, in the shape make_peft expects (`.model`)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return SimpleNamespace(model=model)


def build_adapter(base: SimpleNamespace, kind: str, out_dir: Path, seed: int = 1, scale: float = 0.1) -> Path:
    make_peft(base, kind, out_dir, seed=seed, scale=scale)
    return out_dir


def adapter_files(adapter_dir: Path, config_name: str = "adapter_config.json",
                  weights_name: str = "adapter_model.safetensors") -> dict:
    return {
        "config": (config_name, (adapter_dir / "adapter_config.json").read_bytes(), "application/json"),
        "weights": (weights_name, (adapter_dir / "adapter_model.safetensors").read_bytes(),
                    "application/octet-stream"),
    }


def upload(client: httpx.Client, adapter_id: str, adapter_dir: Path | None = None, *, key: str = ALICE,
           files: dict | None = None, **kw) -> httpx.Response:
    files = files if files is not None else adapter_files(adapter_dir)
    return client.put(f"/v1/adapters/{adapter_id}", files=files, headers=auth(key), **kw)


def store_files(root: Path) -> list[str]:
    """Every file under the store: a refused upload must not change this."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def raw_request(base_url: str, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: bytes = b"") -> tuple[int, dict]:
    """Send `path` byte for byte (httpx would normalise `..`): status and JSON body."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()
