"""A server started with `quantize=int8` (torchao) or `quantize=nf4` (bitsandbytes), over real HTTP: an adapter's
greedy text is PEFT's on the same model quantized by transformers, a merge is refused with 409 and its reason,
and a QLoRA job trains through the quantized base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from server.app import create_app
from tests.api.adapter_http import ALICE, auth, build_adapter, load_tiny, upload, write_keys
from tests.harness import cpu_settings, running_server
from tests.quantized_base import reference


@pytest.fixture(scope="module", params=["int8", "nf4"])
def served(request: pytest.FixtureRequest, tiny_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    tmp = tmp_path_factory.mktemp("quantized-server")
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"),
                            max_adapters_resident=2, max_batch=4, quantize=request.param)
    app = create_app(settings)
    with running_server(app) as url:
        yield url, app.state.services


def test_adapter_on_the_quantized_base_generates_peft_text_and_merge_is_refused(served, tiny_model_dir, tmp_path):
    from peft import PeftModel

    url, services = served
    mode = services.base.quantize
    assert mode in ("int8", "nf4")
    adapter = build_adapter(load_tiny(tiny_model_dir), "lora_all", tmp_path / "a", seed=5, scale=0.5)
    prompt = "The quick brown fox jumps over"
    with httpx.Client(base_url=url, timeout=120) as client:
        assert upload(client, "qa", adapter).status_code in (200, 201)
        r = client.post("/generate", json={"prompt": prompt, "adapter_id": "qa", "temperature": 0,
                                           "max_new_tokens": 10}, headers=auth(ALICE))
        assert r.status_code == 200, r.text
        plain = client.post("/generate", json={"prompt": prompt, "temperature": 0, "max_new_tokens": 10},
                            headers=auth(ALICE))
        assert plain.status_code == 200 and plain.json()["text"] != r.json()["text"], "the adapter changes the text"
        merged = client.post("/v1/adapters/qa/merge", headers=auth(ALICE))
    assert merged.status_code == 409
    error = merged.json()["error"]
    assert error["type"] and f"base model is quantized ({mode} weight-only)" in error["message"]

    tokenizer = services.base.tokenizer
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    peft_model = PeftModel.from_pretrained(reference(tiny_model_dir, mode).model, str(adapter)).eval()
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    assert r.json()["text"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_qlora_job_over_http_trains_through_the_quantized_base_and_serves_at_once(served):
    """The job API on a quantized server: the base stays quantized and the adapter serves what it learned."""
    from server.model.quantize import is_quantized
    from tests.harness import TRAIN_DATA, wait_job

    url, services = served
    spec = dict(adapter_id="qpirate", method="lora", rank=8, alpha=16, batch_size=2, seed=0, data=TRAIN_DATA,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "lm_head"], steps=50, learning_rate=1e-2)
    r = httpx.post(f"{url}/v1/training/jobs", json=spec, headers=auth(ALICE), timeout=30)
    assert r.status_code == 202, r.text
    job = wait_job(url, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
                   headers=auth(ALICE))
    assert job["status"] == "succeeded", job["error"]
    assert job["loss_history"][-1]["loss"] < 0.05 * job["loss_history"][0]["loss"]
    q = dict(services.base.model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert is_quantized(q.base_layer.weight)
    for ex in TRAIN_DATA:
        out = httpx.post(f"{url}/generate", headers=auth(ALICE), timeout=60,
                         json={"prompt": ex["prompt"], "adapter_id": "qpirate", "max_new_tokens": 20}).json()
        assert out["text"] == ex["completion"] and out["finish_reason"] == "stop", out
