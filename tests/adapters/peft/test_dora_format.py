"""Reading PEFT DoRA files: what is accepted, and each DoRA form still refused with its message."""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.weights.lora import LoraWeights
from server.errors import AdapterError

PREFIX = "base_model.model.model.layers.0.self_attn."


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dora_format")
    settings = af.adapter_settings(tmp)
    base = af.tiny_base(0)
    return base, AdapterLimits.from_settings(settings), tmp


def _refused(path, base, limits, match: str) -> None:
    with pytest.raises(AdapterError, match=match) as err:
        read_adapter(path, base, limits)
    assert err.value.status == 422


def test_dora_file_loads_with_its_rescale(made):
    base, limits, tmp = made
    model = af.make_peft(base, "dora_qv", tmp / "ok")
    loaded = read_adapter(tmp / "ok", base, limits)
    assert loaded.variant == "dora" and loaded.summary()["variant"] == "dora"
    weights = loaded.modules["model.layers.0.self_attn.q_proj"]
    assert isinstance(weights, LoraWeights) and weights.dora_scale is not None
    peft_q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # PEFT's own g: m / ‖W + s·BA‖ of the module it built
        norm = peft_q.lora_magnitude_vector["default"].get_weight_norm(
            peft_q.base_layer.weight, peft_q.get_delta_weight("default"), scaling=1)
        expected = peft_q.lora_magnitude_vector["default"].weight / norm
    torch.testing.assert_close(weights.dora_scale, expected, atol=1e-6, rtol=1e-6)
    assert loaded.nbytes == sum(w.nbytes for w in loaded.modules.values())
    assert weights.nbytes == (weights.a.numel() + weights.bt.numel() + weights.dora_scale.numel()) * 4


def test_dora_on_an_embedding_is_refused_naming_the_module(made, tmp_path):
    from peft import LoraConfig, get_peft_model
    import copy

    base, limits, _ = made
    peft = get_peft_model(copy.deepcopy(base.model),
                          LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    peft.save_pretrained(tmp_path)
    _refused(tmp_path, base, limits, r"DoRA \(use_dora\) on target module 'model.embed_tokens', an Embedding "
                                     r"module, is not supported: DoRA is served on Linear modules only")


def test_dora_config_without_magnitudes_is_refused(made):
    base, limits, tmp = made
    af.make_peft(base, "dora_qv", tmp / "nomag")
    af.edit_tensors(tmp / "nomag", lambda t: {k: v for k, v in t.items() if "magnitude" not in k})
    _refused(tmp / "nomag", base, limits, r"use_dora is set but its DoRA magnitude tensor \(lora_magnitude_vector\) "
                                          "is missing")


def test_magnitudes_without_use_dora_are_refused(made):
    base, limits, tmp = made
    af.make_peft(base, "dora_qv", tmp / "hidden")
    af.edit_config(tmp / "hidden", use_dora=False)
    _refused(tmp / "hidden", base, limits, r"DoRA magnitude tensors \(lora_magnitude_vector\) in an adapter whose "
                                           "config does not set use_dora")


def test_magnitude_of_the_wrong_shape_is_refused(made):
    base, limits, tmp = made
    af.make_peft(base, "dora_qv", tmp / "shape")
    key = PREFIX + "q_proj.lora_magnitude_vector"
    af.edit_tensors(tmp / "shape", lambda t: {**t, key: torch.ones(7)})
    _refused(tmp / "shape", base, limits, r"lora_magnitude_vector' has shape \[7\] but module .* needs \[64\]")


def test_use_dora_must_be_a_boolean(made):
    base, limits, tmp = made
    af.make_peft(base, "dora_qv", tmp / "str")
    af.edit_config(tmp / "str", use_dora="yes")
    _refused(tmp / "str", base, limits, "use_dora must be true or false")


def test_a_zero_column_norm_is_refused(made, tmp_path):
    """B·A = 0 on a zero row of W: PEFT divides by a zero norm there."""
    base, limits, tmp = made
    af.make_peft(base, "dora_qv", tmp / "zero")
    af.edit_tensors(tmp / "zero", lambda t: {**t, PREFIX + "q_proj.lora_B.weight": torch.zeros(64, 8)})
    zeroed = af.tiny_base(0)
    with torch.no_grad():
        zeroed.model.model.layers[0].self_attn.q_proj.weight[5].zero_()
    _refused(tmp / "zero", zeroed, limits, r"module 'model.layers.0.self_attn.q_proj': DoRA's column norm "
                                           r"‖W \+ s·BA‖ is zero in an output row")


def test_dora_on_a_module_that_is_not_linear_is_refused(made):
    base, limits, tmp = made
    af.make_peft(base, "dora_qv", tmp / "attn")
    af.edit_config(tmp / "attn", target_modules=["q_proj", "v_proj", "self_attn"])
    _refused(tmp / "attn", base, limits, r"target module 'model.layers.0.self_attn' is neither a Linear nor an "
                                         "Embedding module, which LORA cannot adapt")
