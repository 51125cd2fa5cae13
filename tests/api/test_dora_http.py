"""A DoRA adapter uploaded over HTTP is served as PEFT runs it; DoRA on an embedding is refused with 422."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from server.app import create_app
from tests.adapters.adapter_factory import edit_tensors, make_peft
from tests.api.adapter_http import ALICE, auth, load_tiny, upload, write_keys
from tests.harness import cpu_settings, running_server

PROMPT = "The quick brown fox jumps over the lazy dog and then"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object, Path]]:
    from peft import PeftModel

    tmp = tmp_path_factory.mktemp("dora-http")
    make_peft(load_tiny(tiny_model_dir), "dora_all", tmp / "dora", seed=3, scale=1.0)
    gen = torch.Generator().manual_seed(3)  # magnitudes far from the norms: the tiny model's greedy text moves
    edit_tensors(tmp / "dora", lambda t: {k: v * (0.2 + 10 * torch.rand(v.shape, generator=gen))
                                          if "magnitude" in k else v for k, v in t.items()})
    peft = PeftModel.from_pretrained(load_tiny(tiny_model_dir).model, str(tmp / "dora")).eval()
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"),
                            max_adapters_resident=2, max_batch=2)
    with running_server(create_app(settings)) as url:
        yield url, peft, tmp


def test_uploaded_dora_adapter_generates_what_peft_generates(served, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    url, peft, tmp = served
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with httpx.Client(base_url=url, timeout=120) as client:
        created = upload(client, "dora-all", tmp / "dora")
        assert created.status_code == 201, created.text
        assert created.json()["variant"] == "dora"
        body = {"prompt": PROMPT, "adapter_id": "dora-all", "temperature": 0, "max_new_tokens": NEW_TOKENS}
        got = client.post("/generate", json=body, headers=auth(ALICE))
        base = client.post("/generate", json={**body, "adapter_id": None}, headers=auth(ALICE))
    assert got.status_code == 200, got.text
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                            do_sample=False, pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert got.json()["text"] == expected
    assert got.json()["text"] != base.json()["text"], "the adapter must change the output"


def test_dora_on_an_embedding_is_refused_over_http(served, tiny_model_dir: Path) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    url, _, tmp = served
    model = get_peft_model(copy.deepcopy(load_tiny(tiny_model_dir).model),
                           LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp / "dora-embed")
    with httpx.Client(base_url=url, timeout=120) as client:
        r = upload(client, "dora-embed", tmp / "dora-embed")
    assert r.status_code == 422
    assert "DoRA (use_dora) on target module 'model.embed_tokens', an Embedding module" in r.json()["error"]["message"]
