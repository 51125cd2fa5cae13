"""`method: dora` jobs: what PEFT loads with use_dora=True generates what our server generates, and
the DoRA forms a job cannot train are refused with their message."""

from __future__ import annotations

import json

import pytest
import torch

from server.errors import InvalidRequest
from server.training.export import CONFIG_NAME
from server.training.modules import plan_targets
from tests.training.conftest import assert_served_like_peft, make_spec, make_trainer


@pytest.fixture(scope="module")
def peft_base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_dora_job_round_trips_through_peft(tiny_served, train_settings, peft_base, tmp_path):
    from peft import PeftModel

    spec = make_spec(method="dora", steps=30, learning_rate=5e-2, target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = make_trainer(tiny_served, spec)
    initial = {n: m.lora_magnitude_vector.detach().clone() for n, m in trainer.adapters.items()}
    for _ in range(spec.steps):
        trainer.train_step()
    assert any(not torch.equal(initial[n], m.lora_magnitude_vector) for n, m in trainer.adapters.items()), \
        "the magnitudes are trained"
    out = tmp_path / "dora"
    trainer.save_output(out, "tiny")
    assert json.loads((out / CONFIG_NAME).read_text())["use_dora"] is True

    peft_model = PeftModel.from_pretrained(peft_base, str(out)).eval()
    try:
        assert peft_model.peft_config["default"].use_dora
        assert_served_like_peft(tiny_served, out, train_settings, peft_model)
    finally:
        peft_model.unload()


def test_dora_job_on_an_embedding_is_refused(tiny_served):
    spec = make_spec(method="dora", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(InvalidRequest, match=r"DoRA trains Linear modules only; 'model.embed_tokens' is an "
                                             r"Embedding \(use method 'lora'\)"):
        plan_targets(tiny_served.model, spec)


def test_dora_job_on_a_weight_with_a_zero_row_is_refused(tiny_served):
    """The tiny model's lm_head is tied to an embedding whose padding row is zero: PEFT would train NaNs."""
    spec = make_spec(method="dora", target_modules=["lm_head"])
    with pytest.raises(InvalidRequest, match=r"DoRA cannot adapt 'lm_head': its weight has an all-zero output row"):
        plan_targets(tiny_served.model, spec)


def test_dora_job_refuses_miss_options():
    with pytest.raises(ValueError, match="variant and mini_r apply to method 'miss' only"):
        make_spec(method="dora", variant="mini", mini_r=2)
