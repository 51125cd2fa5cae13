"""float16 adapter slots (settings.slot_dtype) served over real HTTP: same greedy text as float32 slots.

The layer and kernel tests check the float16 math exactly (against the rounded weights); this
checks the wiring end to end: a real uvicorn, adapters uploaded over REST, the engine's decode
through the float16 kernel variant, and that the rounding (~5e-4 relative on the adapter weights)
does not change what a user gets.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from server.app import create_app
from server.settings import Settings
from tests.api.adapter_http import ALICE, auth, build_adapter, load_tiny, upload, write_keys
from tests.harness import cpu_settings, running_server

KINDS = ["lora_all", "lora_embed", "miss_balance"]
PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time"]


@pytest.fixture(scope="module")
def peft_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("peft-f16")
    base = load_tiny(tiny_model_dir)
    return {kind: build_adapter(base, kind, out / kind, seed=3, scale=1.0) for kind in KINDS}


def _serve_and_generate(tiny_model_dir: Path, tmp: Path, peft_dirs: dict[str, Path], slot_dtype: str,
                        ) -> dict[tuple[str | None, str], str]:
    tmp.mkdir()
    settings = cpu_settings(tiny_model_dir, tmp / "store",
                            api_keys=write_keys(tmp / "keys.json"), max_adapters_resident=4, max_batch=8,
                            slot_dtype=slot_dtype)
    app = create_app(settings)
    texts: dict[tuple[str | None, str], str] = {}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        bank = app.state.services.adapters.layers["model.layers.0.self_attn.q_proj"].bank
        assert bank.slot_dtype == (torch.float16 if slot_dtype == "float16" else torch.float32)
        for kind, path in peft_dirs.items():
            assert upload(client, kind.replace("_", "-"), path).status_code == 201
        for adapter in [None, *(k.replace("_", "-") for k in KINDS)]:
            for prompt in PROMPTS:
                r = client.post("/generate", json={"prompt": prompt, "adapter_id": adapter, "temperature": 0,
                                                   "max_new_tokens": 16}, headers=auth(ALICE))
                assert r.status_code == 200, r.text
                texts[(adapter, prompt)] = r.json()["text"]
        if slot_dtype == "float16":
            assert bank.a is not None and bank.a.dtype == torch.float16  # what was served came from these
    return texts


def test_float16_slots_generate_what_float32_slots_generate(tiny_model_dir: Path, tmp_path: Path, peft_dirs):
    f32 = _serve_and_generate(tiny_model_dir, tmp_path / "f32", peft_dirs, "auto")
    f16 = _serve_and_generate(tiny_model_dir, tmp_path / "f16", peft_dirs, "float16")
    assert f16 == f32
    for kind in KINDS:  # every adapter moved the output, or equality would prove nothing
        assert any(f32[(kind.replace("_", "-"), p)] != f32[(None, p)] for p in PROMPTS), kind


def test_slot_dtype_env_twin_and_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_SLOT_DTYPE", "float16")
    assert Settings(store=tmp_path, device="cpu").slot_torch_dtype == torch.float16
    monkeypatch.setenv("LORAPLEX_SLOT_DTYPE", "int8")
    with pytest.raises(ValueError, match="slot_dtype"):
        Settings(store=tmp_path, device="cpu")
