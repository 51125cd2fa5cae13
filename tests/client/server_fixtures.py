"""Fixtures: one real server (tiny Llama, API keys on) per test module, PEFT adapters, a JSONL file.

Imported by the test modules (not a conftest: `conftest` as a module name is
taken by tests/conftest.py, which the adapter factory imports).

Adapters are real PEFT directories (`save_pretrained`) built for the tiny model
by the adapter tests' factory, so uploads go through the real validator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.adapter_http import load_tiny
from tests.harness import cpu_settings, running_server

KEY = "client-key-alice-01"
OTHER_KEY = "client-key-bob-0001"
KEYS = {KEY: {"tenant": "alice"}, OTHER_KEY: {"tenant": "bob"}}
TRAIN_DATA = [{"prompt": "Say hi:", "completion": " Ahoy matey!"},
              {"prompt": "Sky colour?", "completion": " Blue as the briny deep, arr."}]


@pytest.fixture(scope="module")
def peft_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA (q_proj, v_proj) for the tiny model, saved by PEFT itself.

    Weights at scale 0.5 (the factory's default 0.1 is too weak to move the
    tiny model's greedy tokens, and the tests check that the adapter does).
    """
    from tests.adapters.adapter_factory import make_peft

    out = tmp_path_factory.mktemp("client-peft") / "lora"
    make_peft(load_tiny(tiny_model_dir), "lora_qv", out, seed=1, scale=0.5)
    return out


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("client-server")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps(KEYS))
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=keys, max_rank=32, max_adapters_resident=4)
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client-data") / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in TRAIN_DATA))
    return path
