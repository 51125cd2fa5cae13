"""Adapter terms on a 16-bit model: accumulated in float32 and rounded once onto the base output.

The oracle is `round(base + x·Aᵀ·(B·s)ᵀ)` with the adapter term in float32 from the very factors the
slots hold; a path that rounds the shrink, the expand and the add separately (three roundings) lands
several bfloat16 steps away on some outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapter_factory as af
from server.adapters.inject import inject_adapter_layers
from server.adapters.mapping import AdapterMapping
from server.adapters.peft_format import read_adapter
from server.adapters.step import adapter_step

NAME = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16])
def half_layers(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("half")
    settings = af.adapter_settings(tmp, max_adapters_resident=2)
    af.make_peft(af.tiny_base(seed=0), "lora_all", tmp / "a", seed=3, scale=0.5)
    af.make_peft(af.tiny_base(seed=0), "lora_embed", tmp / "e", seed=4, scale=0.5)
    base = af.tiny_base(seed=0)
    base.model.to(request.param)
    base.dtype = request.param
    layers = inject_adapter_layers(base.model, settings)
    layers.load_slot(0, read_adapter(tmp / "a", base, settings))
    layers.load_slot(1, read_adapter(tmp / "e", base, settings))
    return layers, request.param


def _oracle(layer, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    bank = layer.bank
    y = F.linear(x, layer.base_layer.weight, layer.base_layer.bias).float()  # [tokens, out]
    for t, slot in enumerate(slots):
        r = bank.ranks[slot]
        if slot >= 0 and r:
            y[t] += (x[t].float() @ bank.a[slot, :r].float().T) @ bank.bt[slot, :r].float()
    return y.to(x.dtype)


def _steps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable steps (ulps) between two same-dtype tensors of one sign pattern."""
    bits = torch.int16
    return int((a.view(bits).int() - b.view(bits).int()).abs().max())


@pytest.mark.parametrize("layout", ["decode", "prefill"])
def test_linear_adapter_term_is_rounded_once(half_layers, layout):
    layers, dtype = half_layers
    layer = layers[NAME]
    slots = [0, -1, 0, 0, -1, 0] if layout == "decode" else [0] * 12 + [-1] * 3  # short rows vs a long run
    x = torch.randn(len(slots), layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots(slots)):
        got = layer(x)
    expected = _oracle(layer, x, slots)
    assert _steps_apart(got, expected) <= 1, "one rounding of a float32 sum: at most one step from the oracle"
    # The same term with every piece rounded to the model's dtype (what a 16-bit path does) is further away.
    bank = layer.bank
    r = bank.ranks[0]
    rounded = F.linear(x, layer.base_layer.weight)
    rows = [t for t, s in enumerate(slots) if s == 0]
    rounded[rows] = rounded[rows] + (x[rows] @ bank.a[0, :r].T) @ bank.bt[0, :r]
    assert _steps_apart(rounded, expected) > 1


def test_embedding_adapter_term_is_rounded_once(half_layers):
    layers, dtype = half_layers
    layer = layers["model.embed_tokens"]
    ids = torch.randint(3, af.VOCAB, (6,), generator=torch.Generator().manual_seed(2))
    slots = [1, 1, -1, 1, 1, 1]
    with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots(slots)):
        got = layer(ids)
    bank = layer.bank
    r = bank.ranks[1]
    expected = layer.base_layer(ids).float()
    on = torch.tensor([t for t, s in enumerate(slots) if s == 1])
    expected[on] += bank.a[1, ids[on], :r].float() @ bank.bt[1, :r].float()
    assert _steps_apart(got, expected.to(dtype)) <= 1
