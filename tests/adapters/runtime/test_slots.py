"""Device slots: what replacing one adapter by another in a slot leaves behind (nothing of the old one).

A reload overwrites the rows both adapters use and zeroes only the old rows past the new rank
(every step reads `r_used` rows of each active slot, so those must be zero), instead of zeroing
the whole slot first and writing it again. These tests pin that the cheaper write is as clean.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from tests.adapters.layer_reference import reference
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.weights.loaded import LoadedAdapter
from server.adapters.weights.lora import LoraWeights
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.weights.miss import BatWeights, MissWeights
from server.adapters.runtime.step import adapter_step

Q, V, DOWN, EMB = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.1.mlp.down_proj", "model.embed_tokens")


@pytest.fixture
def layers(tmp_path):
    base = af.tiny_base(seed=0)
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp_path, max_adapters_resident=3, max_rank=16))
    return inject_adapter_layers(base.model, limits)


def _lora(layers, name: str, r: int, seed: int, embedding: bool = False) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    layer = layers[name]
    rows_in = layer.num_embeddings if embedding else layer.in_features
    cols_out = layer.embedding_dim if embedding else layer.out_features
    return LoraWeights(torch.randn(r, rows_in, generator=g), torch.randn(r, cols_out, generator=g), embedding=embedding)


def _adapter(modules: dict) -> LoadedAdapter:
    return LoadedAdapter("lora", "default", max(w.rank for w in modules.values()), tuple(sorted(modules)), modules,
                         sum(w.nbytes for w in modules.values()))


def _assert_slot_is(bank, slot: int, weights) -> None:
    a, bt = weights.factors()
    r = a.shape[0]
    a_slot = bank.a[slot].T if bank.embedding else bank.a[slot]  # [r_cap, in]
    torch.testing.assert_close(a_slot[:r], a.to(bank.a.dtype), rtol=0, atol=0)
    torch.testing.assert_close(bank.bt[slot, :r], bt.to(bank.bt.dtype), rtol=0, atol=0)
    assert not a_slot[r:].any() and not bank.bt[slot, r:].any(), "rows past the rank must be zero"
    assert bank.ranks[slot] == r


@pytest.mark.parametrize("name, embedding", [(Q, False), (EMB, True)])
def test_a_lower_rank_adapter_leaves_no_rows_of_the_higher_rank_one(layers, name, embedding):
    bank = layers[name].bank
    bank.write(1, _lora(layers, name, 12, seed=1, embedding=embedding))
    bank.write(0, _lora(layers, name, 16, seed=2, embedding=embedding))
    assert bank.r_used == 16
    low = _lora(layers, name, 4, seed=3, embedding=embedding)
    bank.write(0, low)
    _assert_slot_is(bank, 0, low)
    assert bank.r_used == 12  # slot 1 still holds rank 12
    higher = _lora(layers, name, 8, seed=4, embedding=embedding)
    bank.write(0, higher)  # and upwards again: rows 4..7 are written, not left from before
    _assert_slot_is(bank, 0, higher)


def test_kinds_replace_each_other_cleanly(layers):
    bank = layers[Q].bank
    lora = _lora(layers, Q, 12, seed=5)
    bank.write(0, lora)
    miss = MissWeights(torch.randn(4, layers[Q].out_features), layers[Q].in_features, layers[Q].out_features)
    bank.write(0, miss)
    _assert_slot_is(bank, 0, miss)
    bat = BatWeights(torch.randn(layers[Q].out_features // 4, 4, 4))
    bank.write(0, bat)
    assert not bank.a[0].any() and not bank.bt[0].any() and bank.ranks[0] == 0 and 0 in bank.bat
    bank.write(0, lora)
    _assert_slot_is(bank, 0, lora)
    assert 0 not in bank.bat


def test_load_slot_replaces_the_old_adapter_module_by_module(layers):
    old = _adapter({Q: _lora(layers, Q, 12, seed=6), V: _lora(layers, V, 12, seed=7)})
    new = _adapter({V: _lora(layers, V, 4, seed=8), DOWN: _lora(layers, DOWN, 8, seed=9)})
    layers.load_slot(2, old)
    layers.load_slot(2, new)
    assert layers[Q].bank.ranks[2] == 0 and not layers[Q].bank.a[2].any() and not layers[Q].bank.bt[2].any()
    _assert_slot_is(layers[V].bank, 2, new.modules[V])
    _assert_slot_is(layers[DOWN].bank, 2, new.modules[DOWN])
    x = torch.randn(3, 1, layers[V].in_features)
    mapping = AdapterMapping.from_token_slots([2, 2, -1])
    with torch.no_grad(), adapter_step(mapping):
        torch.testing.assert_close(layers[V](x), reference(layers[V], x, mapping), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layers[Q](x), layers[Q].base_layer(x), rtol=0, atol=0)  # no trace of the old


def test_a_failed_load_leaves_the_slot_empty_not_half_replaced(layers, monkeypatch):
    old = _adapter({Q: _lora(layers, Q, 8, seed=10), V: _lora(layers, V, 8, seed=11)})
    layers.load_slot(0, old)
    broken = _adapter({Q: _lora(layers, Q, 4, seed=12), DOWN: _lora(layers, DOWN, 4, seed=13)})

    def refuse(slot, weights, stage=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(layers[DOWN].bank, "write", refuse)
    with pytest.raises(RuntimeError, match="disk on fire"):
        layers.load_slot(0, broken)
    for name in (Q, V):
        bank = layers[name].bank
        assert bank.ranks[0] == 0 and not bank.a[0].any() and not bank.bt[0].any(), name


# --- growth off the engine thread ---------------------------------------------------------------

@pytest.mark.parametrize("name, embedding", [(Q, False), (EMB, True)])
def test_a_reservation_is_what_the_write_uses(layers, name, embedding):
    """reserve() (a loader thread) allocates; write() (the engine thread) only swaps the tensors in."""
    bank = layers[name].bank
    bank.reserve(12)
    assert bank.r_cap == 0 and bank.a is None, "nothing visible to steps before the engine thread swaps"
    pending_a, pending_bt = bank._pending
    w = _lora(layers, name, 12, seed=1, embedding=embedding)
    bank.write(2, w)
    assert bank.a is pending_a and bank.bt is pending_bt and bank._pending is None
    assert bank.r_cap == 16  # rounded up to a multiple of 8 (max_rank 16)
    _assert_slot_is(bank, 2, w)


def test_growth_keeps_resident_slots_and_too_small_a_reservation_is_not_used(layers):
    bank = layers[Q].bank
    small = _lora(layers, Q, 4, seed=1)
    bank.write(0, small)  # r_cap 8, allocated on this thread (no reservation)
    bank.reserve(4)
    assert bank._pending is None, "enough capacity already: nothing to reserve"
    bank.reserve(12)
    reserved = bank._pending
    assert reserved is not None and reserved[1].shape[1] == 16
    bank.reserve(10)
    assert bank._pending is reserved, "a smaller need keeps the larger reservation"
    big = _lora(layers, Q, 12, seed=2)
    bank.write(1, big)
    assert bank.bt is reserved[1]
    _assert_slot_is(bank, 0, small)  # copied across the growth
    _assert_slot_is(bank, 1, big)


def test_a_reservation_smaller_than_the_write_is_replaced(layers, tmp_path):
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp_path, max_adapters_resident=2, max_rank=32))
    wide = inject_adapter_layers(af.tiny_base(seed=0).model, limits)
    bank = wide[V].bank
    bank.reserve(8)
    w = _lora(wide, V, 24, seed=3)
    bank.write(0, w)
    assert bank.r_cap == 24 and bank._pending is None
    _assert_slot_is(bank, 0, w)
