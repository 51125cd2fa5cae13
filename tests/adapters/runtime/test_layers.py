"""Adapter layers on a bfloat16 / float16 model: the adapter term in float32, rounded once.

The served output of an adapted module must be `(base.float() + term).to(dtype)`
with `term = x·Aᵀ·Bᵀ·s` (bat: `x·ΔWᵀ`) computed from the factors the slots hold,
widened exactly: the only error the adapter adds is the final rounding, half an
ulp of the output. Rounding `x·Aᵀ`, then the term, then the sum (the model's
dtype throughout) misses that bound by several ulps. The float32 model's path is
checked against its reference in test_adapter_mixed_batch.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.adapters import adapter_factory as af
from tests.adapters.layer_reference import reference
from server.adapters.runtime.backend import TorchBackend
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.layers import AdaptedModule
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.weights.miss import bat_delta
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.step import adapter_step

KINDS = ["lora_all", "lora_embed", "miss_balance", "miss_bat"]
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
          "model.embed_tokens"]
U32 = 2.0 ** -24  # float32's unit roundoff
SHAPES = {"flat": (40,), "prefill": (3, 16), "decode": (32, 1)}


@pytest.fixture(scope="module", params=["bfloat16", "float16", "bfloat16-float32-slots"])
def half(request, tmp_path_factory):
    """A tiny Llama in 16 bits with every kind above resident (PEFT's float32 files; slots in the
    model's dtype, or kept in float32 by settings.slot_dtype)."""
    name, _, slots = request.param.partition("-")
    dtype = getattr(torch, name)
    tmp = tmp_path_factory.mktemp(name)
    settings = af.adapter_settings(tmp, dtype=name, max_adapters_resident=len(KINDS),
                                   slot_dtype="float32" if slots else "auto")
    peft_base = af.tiny_base(seed=0)
    ours = af.tiny_base(seed=0)
    ours = dataclasses.replace(ours, model=ours.model.to(dtype), dtype=dtype)
    limits = AdapterLimits.from_settings(settings)
    layers = inject_adapter_layers(ours.model, limits)
    for slot, kind in enumerate(KINDS):
        af.make_peft(peft_base, kind, tmp / kind, seed=40 + slot, scale=0.3)
        layers.load_slot(slot, read_adapter(tmp / kind, ours, limits))
    layer = layers[LAYERS[0]]
    assert layer.bank.slot_dtype == (torch.float32 if slots else dtype)
    assert isinstance(layer.backend, TorchBackend)  # the CPU kernel serves float32 models only
    return dtype, layers


def _mixed_slots(n: int, seed: int) -> list[int]:
    """Token slots with long runs (segments), short runs (grouped) and base tokens interleaved,
    every kind present (the first of at most 100 seeds that gives that)."""
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed * 100 + attempt)
        out: list[int] = []
        while len(out) < n:
            slot, run = int(torch.randint(-1, len(KINDS), (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
            out.extend([slot] * run)
        if set(out[:n]) == set(range(-1, len(KINDS))):
            return out[:n]
    raise AssertionError(f"no seed gave every kind in {n} tokens")


def _input(layer: AdaptedModule, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(shape) + shape[0])
    if layer.module_name.endswith("embed_tokens"):
        return torch.randint(0, layer.num_embeddings, shape, generator=g)
    return torch.randn(*shape, layer.in_features, generator=g).to(dtype)


def _exact_term(layer: AdaptedModule, x: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's adapter term, exactly, from the factors as the slots hold them, and the float32
    error bound of computing it: `(in + r)` roundings of the sum of the products' magnitudes.
    Both `[tokens, out]` float64."""
    bank = layer.bank
    embedding = layer.module_name.endswith("embed_tokens")
    flat = x.reshape(-1) if embedding else x.reshape(-1, x.shape[-1]).double()
    terms, slack = [], []
    for t, slot in enumerate(slots):
        zero = torch.zeros(bank.out_features, dtype=torch.float64)
        if slot < 0 or (not bank.ranks[slot] and slot not in bank.bat):
            terms.append(zero)
            slack.append(zero)
        elif slot in bank.bat:
            delta = bat_delta(layer.weight.float(), bank.bat[slot]).double()  # [out, in], as served
            terms.append(flat[t] @ delta.T)
            slack.append(flat[t].abs() @ delta.abs().T * bank.in_features * U32)
        else:
            r = bank.ranks[slot]
            a = bank.a[slot, flat[t], :r].double() if embedding else bank.a[slot, :r].double()  # [r] | [r, in]
            bt = bank.bt[slot, :r].double()  # [r, out]
            if embedding:
                terms.append(a @ bt)
                slack.append(a.abs() @ bt.abs() * r * U32)
            else:
                terms.append(a @ flat[t] @ bt)
                slack.append(a.abs() @ flat[t].abs() @ bt.abs() * (bank.in_features + r) * U32)
    return torch.stack(terms), torch.stack(slack)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |v| (float64 in, float64 out)."""
    info = torch.finfo(dtype)
    _, exp = torch.frexp(v.abs())
    return torch.ldexp(torch.full_like(v, info.eps), exp - 1).clamp_min(info.smallest_normal * info.eps)


def _served(layer: AdaptedModule, x: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapted output, base output), both `[tokens, out]` in the model's dtype."""
    with torch.no_grad():
        with adapter_step(AdapterMapping.from_token_slots(slots)):
            got = layer(x)
        base = layer.base_layer(x)
    return got.reshape(len(slots), -1), base.reshape(len(slots), -1)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_adapter_term_is_accumulated_in_float32_and_rounded_once(half, name, shape):
    dtype, layers = half
    layer = layers[name]
    slots = _mixed_slots(int(torch.tensor(shape).prod()), seed=len(name) + shape[0])
    x = _input(layer, shape, dtype)
    got, base = _served(layer, x, slots)
    assert got.dtype == dtype
    term, slack = _exact_term(layer, x, slots)  # [tokens, out]
    exact = base.double() + term
    assert term.abs().max() > 0.1 * base.double().abs().max(), "the term must matter"
    # the only error is the final rounding: half an ulp (+ float32's own accumulation error)
    err = (got.double() - exact).abs()
    bound = 0.5 * _ulp(torch.maximum(got.double().abs(), exact.abs()), dtype) + slack
    worst = float((err / bound).max())
    assert worst <= 1.0, f"adapter term off by {worst:.2f}x the bound of a float32 term rounded once"
    # i.e. the output is (base.float() + x·Aᵀ·Bᵀ·s).to(dtype), equal but for float32 near-ties
    oracle = exact.to(dtype)
    assert float((got != oracle).float().mean()) <= 0.01


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fast_path_within_an_ulp_of_reference(half, name, shape):
    """The reference is `x·(W + ΔW)ᵀ` in float32, rounded once; the fast path also rounds the base
    output first, so they differ by at most that rounding and the final one."""
    dtype, layers = half
    layer = layers[name]
    slots = _mixed_slots(int(torch.tensor(shape).prod()), seed=len(name) + shape[0])
    x = _input(layer, shape, dtype)
    got, base = _served(layer, x, slots)
    ref = reference(layer, x, AdapterMapping.from_token_slots(slots)).reshape(len(slots), -1)
    assert ref.dtype == dtype
    err = (got.double() - ref.double()).abs()
    _, slack = _exact_term(layer, x, slots)  # + the reference's own float32 error on the base product
    if not layer.module_name.endswith("embed_tokens"):
        flat = x.reshape(len(slots), -1).double().abs()
        slack = slack + flat @ layer.weight.double().abs().T * layer.in_features * U32
    bound = (0.5 * _ulp(base.double(), dtype) + slack
             + _ulp(torch.maximum(got.double().abs(), ref.double().abs()), dtype))
    assert float((err / bound).max()) <= 1.0
    base_rows = torch.tensor(slots) < 0
    assert torch.equal(got[base_rows], base[base_rows]), "base tokens stay the base layer's output, bit for bit"
