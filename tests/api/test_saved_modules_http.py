"""Adapters with modules_to_save over HTTP: uploaded, served as PEFT runs them (concurrently, in one
module-copy row they take in turn), and refused with 422 past the copy budget or for other modules."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from server.app import create_app
from tests.adapters.adapter_factory import edit_config, make_peft
from tests.api.adapter_http import ADMIN, ALICE, auth, load_tiny, upload, write_keys
from tests.harness import cpu_settings, running_server

PROMPT = "The quick brown fox jumps over the lazy dog and then"
NEW_TOKENS = 12
TOP = 3  # log-probabilities compared per token: the alternatives move even where greedy text does not
KINDS = {"head": "mts_head", "embed": "mts_embed", "tied": "mts_both_tied"}


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict, Path]]:
    """The tiny model ties its head to its embedding; one copy (49152 × 64 float32) is 12 MiB, so a 20 MiB
    budget holds one copy row: adapters with copies take it in turn."""
    from peft import PeftModel

    tmp = tmp_path_factory.mktemp("mts-http")
    peft = {}
    for i, (name, kind) in enumerate(KINDS.items()):
        make_peft(load_tiny(tiny_model_dir), kind, tmp / name, seed=7 + i)
        peft[name] = PeftModel.from_pretrained(load_tiny(tiny_model_dir).model, str(tmp / name)).eval()
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"),
                            max_adapters_resident=3, max_batch=4, module_copy_budget_mb=20)
    with running_server(create_app(settings)) as url:
        yield url, peft, tmp


def _peft(model, tokenizer) -> tuple[str, list[float]]:
    """PEFT's greedy text and, per generated token, the TOP log-probabilities (largest first)."""
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        logprobs = torch.log_softmax(model(input_ids=out).logits[0, ids.shape[1] - 1:-1].float(), -1)
    chosen = out[0, ids.shape[1]:]
    return tokenizer.decode(chosen, skip_special_tokens=True), logprobs.topk(TOP, -1).values.flatten().tolist()


def test_uploaded_adapters_generate_what_peft_generates_concurrently(served, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    url, peft, tmp = served
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {name: _peft(model, tokenizer) for name, model in peft.items()}
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": NEW_TOKENS, "logprobs": TOP}
    with httpx.Client(base_url=url, timeout=300) as client:
        for name in KINDS:
            created = upload(client, f"mts-{name}", tmp / name)
            assert created.status_code == 201, created.text
        assert created.json()["modules_to_save"] == ["embed_tokens", "lm_head"]

        def generate(adapter: str | None) -> tuple[str, list[float]]:
            r = client.post("/generate", json={**body, "adapter_id": adapter}, headers=auth(ALICE))
            assert r.status_code == 200, r.text
            tops = [sorted((x["logprob"] for x in t["top_logprobs"]), reverse=True) for t in r.json()["logprobs"]]
            return r.json()["text"], [v for top in tops for v in top]

        order = ["mts-head", None, "mts-embed", "mts-tied", "mts-head", "mts-embed"]
        for _ in range(2):  # the second round reloads copies the first one evicted
            with ThreadPoolExecutor(len(order)) as pool:
                results = list(pool.map(generate, order))
            base = results[1]
            for adapter, (text, logprobs) in zip(order, results):
                if adapter is None:
                    continue
                want_text, want_logprobs = expected[adapter.removeprefix("mts-")]
                assert text == want_text, adapter
                assert logprobs == pytest.approx(want_logprobs, abs=1e-4), adapter
                assert logprobs != pytest.approx(base[1], abs=1e-2), f"{adapter} must change the output"
        metrics = client.get("/metrics", headers=auth(ADMIN)).text
    evictions = re.search(r'^loraplex_adapter_cache_evictions_total\{tier="device"\} (\S+)$', metrics, re.M)
    assert evictions and float(evictions.group(1)) >= 2, "the copies took the one row in turn"


def test_copies_past_the_budget_and_other_modules_are_refused(served) -> None:
    url, _, tmp = served
    untied = tmp / "untied"  # without ensure_weight_tying the head and the embedding each get a copy: 24 MiB
    shutil.copytree(tmp / "tied", untied)
    edit_config(untied, ensure_weight_tying=False, modules_to_save=["lm_head", "embed_tokens"])
    norm = tmp / "norm"
    shutil.copytree(tmp / "head", norm)
    edit_config(norm, modules_to_save=["lm_head", "norm"])
    with httpx.Client(base_url=url, timeout=120) as client:
        over = upload(client, "mts-untied", untied)
        other = upload(client, "mts-norm", norm)
    assert over.status_code == 422 and over.json()["error"]["message"].startswith(
        "modules_to_save: this adapter brings 2 whole-module copies (lm_head, model.embed_tokens) of 12.0 MiB each "
        "on this model; the module-copy budget of 20 MiB (module_copy_budget_mb) holds 1: it needs at least 24 MiB")
    assert other.status_code == 422
    assert "selects module 'model.layers.0.input_layernorm', which cannot be replaced whole" in \
        other.json()["error"]["message"]
