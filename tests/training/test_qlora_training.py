"""QLoRA: jobs trained through the quantized base the server serves: int8 weight-only (torchao) and nf4
(bitsandbytes, the classic QLoRA base).

The base is loaded as the server loads it with `quantize=int8|nf4`; the trainer's backward runs through the
quantized Linear (gradients w.r.t. its input only: the base stays frozen and quantized). The exported
adapter must load in PEFT on the same checkpoint quantized by transformers (TorchAoConfig, or
BitsAndBytesConfig nf4: identical codes) and generate the tokens our server generates from it.
"""

from __future__ import annotations

import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.model.load import BaseModel, load_base
from server.model.quantize import is_quantized
from tests.quantized_base import reference, same_quantization
from tests.training.conftest import assert_served_like_peft, make_spec, make_trainer, settings_for


@pytest.fixture(scope="module", params=["int8", "nf4"])
def q_settings(request, tiny_model_dir, tmp_path_factory):
    return settings_for(tiny_model_dir, tmp_path_factory.mktemp("qstore"), quantize=request.param)


@pytest.fixture(scope="module")
def q_served(q_settings) -> BaseModel:
    base = load_base(q_settings)
    inject_adapter_layers(base.model, AdapterLimits.from_settings(q_settings))
    return base


@pytest.fixture(scope="module")
def peft_quantized(tiny_model_dir, q_settings):
    return reference(tiny_model_dir, q_settings.quantize).model


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_backward_through_the_quantized_linear_matches_the_dequantized_one(mode):
    """Also after a no-grad forward (serving), which bitsandbytes would otherwise repack for the CPU."""
    from server.model.quantize import dense_weight, quantize_base

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    quantize_base(model, mode, torch.device("cpu"), torch.float32)
    weight = model[0].weight
    assert is_quantized(weight) and not weight.requires_grad
    with torch.no_grad():
        model(torch.randn(2, 64))
    x = torch.randn(5, 64, requires_grad=True)
    model(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, dense_weight(model[0].weight), model[0].bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "miss"])
def test_qlora_job_round_trips_through_peft_on_the_same_quantized_model(method, q_served, q_settings,
                                                                         peft_quantized, tmp_path):
    from peft import PeftModel

    assert not same_quantization(q_served.model, peft_quantized)
    spec = make_spec(method=method, steps=30, learning_rate=5e-2, target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = make_trainer(q_served, spec)
    for _ in range(spec.steps):
        trainer.train_step()
    out = tmp_path / method
    trainer.save_output(out, "tiny")
    q = dict(q_served.model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert is_quantized(q.base_layer.weight), "training leaves the base quantized"

    peft_model = PeftModel.from_pretrained(peft_quantized, str(out)).eval()
    try:
        assert_served_like_peft(q_served, out, q_settings, peft_model)
    finally:
        peft_model.unload()
