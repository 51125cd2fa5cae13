"""What a job writes is PEFT's own format: PEFT loads it, and PEFT's logits match our server's."""

from __future__ import annotations

import json

import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.step import adapter_step
from server.training.export import CONFIG_NAME
from server.training.trainer import attached, train_mapping
from tests.training.conftest import make_spec, make_trainer, served_logits

CASES = {
    "lora_qv": dict(target_modules=["q_proj", "v_proj"]),
    "lora_rslora_embed_dropout": dict(target_modules=["embed_tokens", "q_proj", "down_proj"], use_rslora=True,
                                      alpha=12, dropout=0.1, rank=4),
    "lora_lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "dora_qv": dict(method="dora", target_modules=["q_proj", "v_proj"]),
    "dora_rslora_dropout": dict(method="dora", target_modules=["q_proj", "down_proj", "o_proj"], use_rslora=True,
                                dropout=0.1, rank=4),
    "miss_balance": dict(method="miss", target_modules=["q_proj", "v_proj", "down_proj"], rank=12),
    "miss_mini": dict(method="miss", variant="mini", mini_r=4, target_modules=["q_proj", "gate_proj"]),
    "miss_bat": dict(method="miss", variant="bat", target_modules=["q_proj", "o_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def peft_base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_trained_adapter_and_logits_match(case, tiny_served, train_settings, peft_base, tmp_path):
    from peft import PeftConfig, PeftModel

    spec = make_spec(steps=4, learning_rate=5e-2, **CASES[case])
    trainer = make_trainer(tiny_served, spec)
    for _ in range(spec.steps):
        trainer.train_step()
    out = tmp_path / "adapter"
    trainer.save_output(out, "tiny")

    # The config is exactly what PEFT itself writes for these settings.
    ours = json.loads((out / CONFIG_NAME).read_text())
    PeftConfig.from_pretrained(str(out)).save_pretrained(str(tmp_path / "peft_cfg"))
    theirs = json.loads((tmp_path / "peft_cfg" / CONFIG_NAME).read_text())
    assert {**ours, "target_modules": sorted(ours["target_modules"])} == \
        {**theirs, "target_modules": sorted(theirs["target_modules"])}

    peft_model = PeftModel.from_pretrained(peft_base, str(out)).eval()
    try:
        trained = [n for n, p in peft_model.named_parameters() if "lora_" in n or "miss_" in n]
        assert trained and all(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if n in trained)
        ids = torch.tensor([tiny_served.tokenizer("Say hi: Ahoy there, sailor")["input_ids"]])
        with torch.no_grad():
            expected = peft_model(input_ids=ids).logits
        layers = inject_adapter_layers(tiny_served.model, AdapterLimits.from_settings(train_settings))
        layers.load_slot(2, read_adapter(out, tiny_served, AdapterLimits.from_settings(train_settings)))
        try:
            got = served_logits(tiny_served, ids, slot=2)
        finally:
            layers.clear_slot(2)
        base_logits = served_logits(tiny_served, ids, slot=-1)
        # ...and the trainer's own forward (train_adapter on TRAIN_SLOT tokens) computes the same thing.
        for m in trainer.adapters.values():
            m.eval()
        with torch.no_grad(), attached(tiny_served.model, trainer.adapters), \
                adapter_step(train_mapping(ids.shape[1], tiny_served.device)):
            train_path = tiny_served.model(input_ids=ids, use_cache=False).logits
        assert (train_path - expected).abs().max().item() < 1e-4
        assert (expected - base_logits).abs().max() > 1e-3  # the adapter does change the output
        assert (got - expected).abs().max().item() < 1e-4
    finally:
        peft_model.unload()
