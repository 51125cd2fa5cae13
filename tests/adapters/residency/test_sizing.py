"""`max_adapters_resident`: auto = a full batch, capped by device memory on a GPU; slots stay lazy."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from server.adapters.limits import AdapterLimits
from server.adapters.residency.sizing import AUTO, bytes_per_slot_rank, plan_slots
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.weights.lora import LoraWeights
from server.app import slot_plan
from server.settings import Settings
from tests.adapters import adapter_factory as af

PER_RANK = 1000  # bytes per slot per rank in the pure planning tests


def test_auto_is_the_default_and_a_full_batch_on_cpu(tmp_path):
    settings = Settings(store=tmp_path, device="cpu", max_batch=24)
    assert settings.max_adapters_resident == AUTO
    assert AdapterLimits.from_settings(settings).max_adapters_resident == 24
    plan = slot_plan(settings, af.tiny_base())
    assert plan.slots == 24 and plan.budget_bytes is None
    assert "24 per adapted module (auto" in plan.describe() and "0 B now" in plan.describe()


def test_an_explicit_count_wins_over_auto(tmp_path):
    settings = Settings(store=tmp_path, device="cpu", max_batch=24, max_adapters_resident="3")
    assert settings.max_adapters_resident == 3
    assert AdapterLimits.from_settings(settings).max_adapters_resident == 3
    assert slot_plan(settings, af.tiny_base()).slots == 3


@pytest.mark.parametrize("bad", ["0", "-2", "many", 0, 2.5, True, ""])
def test_a_bad_slot_count_is_one_clear_error(tmp_path, bad):
    with pytest.raises(ValidationError) as err:
        Settings(store=tmp_path, max_adapters_resident=bad)
    assert len(err.value.errors()) == 1
    assert "positive integer or 'auto'" in str(err.value)


def test_the_env_twin_takes_auto_and_integers(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_ADAPTERS_RESIDENT", "AUTO")
    assert Settings(store=tmp_path).max_adapters_resident == AUTO
    monkeypatch.setenv("LORAPLEX_MAX_ADAPTERS_RESIDENT", "12")
    assert Settings(store=tmp_path).max_adapters_resident == 12


def test_gpu_budget_caps_auto_below_a_full_batch():
    slot_at_max = PER_RANK * 64
    plan = plan_slots(AUTO, max_batch=32, max_rank=64, bytes_per_rank=PER_RANK,
                      free_device_bytes=10 * slot_at_max + 500, reserved_bytes=500, fraction=0.5)
    assert plan.slots == 5 and plan.budget_bytes == 5 * slot_at_max
    assert plan.max_bytes <= plan.budget_bytes
    assert "capped by a device budget" in plan.describe()


def test_gpu_with_room_gives_exactly_a_full_batch_and_never_zero_slots():
    roomy = plan_slots(AUTO, max_batch=32, max_rank=64, bytes_per_rank=PER_RANK, free_device_bytes=1 << 40,
                       reserved_bytes=0, fraction=0.5)
    assert roomy.slots == 32
    full = plan_slots(AUTO, max_batch=32, max_rank=64, bytes_per_rank=PER_RANK, free_device_bytes=100,
                      reserved_bytes=1 << 30, fraction=0.5)  # the KV cache alone overflows: one slot still
    assert full.slots == 1 and full.budget_bytes == 0


def test_an_explicit_count_is_not_capped_on_gpu():
    plan = plan_slots(7, max_batch=32, max_rank=64, bytes_per_rank=PER_RANK, free_device_bytes=1,
                      reserved_bytes=0, fraction=0.5)
    assert plan.slots == 7 and plan.budget_bytes is None


def test_bytes_per_slot_rank_is_what_the_slots_cost(tmp_path):
    """The budget's unit matches the banks' real allocation: one slot of every wrapped module at rank 8."""
    base = af.tiny_base()
    per_rank = bytes_per_slot_rank(base.model, torch.float32.itemsize)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(
        af.adapter_settings(tmp_path, max_adapters_resident=1)))
    assert layers.slot_bytes() == 0, "no adapter yet: no slot memory"
    for name, layer in layers.layers.items():
        embedding = name == "model.embed_tokens"
        rows_in = layer.num_embeddings if embedding else layer.in_features
        cols_out = layer.embedding_dim if embedding else layer.out_features
        layer.bank.write(0, LoraWeights(torch.ones(8, rows_in), torch.ones(8, cols_out), embedding=embedding))
    assert layers.slot_bytes() == per_rank * 8
