"""The module-copy pool's LRU through AdapterManager: one copy row, adapters that need it take turns.

An adapter with a fine-tuned head or embedding is resident only with its copy: taking the row
evicts the previous holder (its slot too), never one in use; a reload is exact (PEFT's logits);
adapters without copies are not touched by any of it.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.residency.copy_rows import CopyRows
from server.adapters.residency.manager import AdapterManager
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.adapters.store.store import AdapterStore
from server.adapters.types import AdapterKey

IDS = torch.randint(3, af.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
ADAPTERS = {"head1": ("mts_head", 1), "embed": ("mts_embed", 2), "plain": ("lora_qv", 3), "head2": ("mts_head", 4)}


def _logits(model, slot: int) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots([slot], IDS.shape[1])):
        return model(input_ids=IDS).logits


@pytest.fixture
def env(tmp_path):
    """3 device slots, a copy budget of 1 MiB: one row (a tiny head copy is 4096 × 64 float32)."""
    settings = af.adapter_settings(tmp_path, max_adapters_resident=3, module_copy_budget_mb=1)
    limits = AdapterLimits.from_settings(settings)
    reference, base = af.tiny_base(0), af.tiny_base(0)
    layers = inject_adapter_layers(base.model, limits)
    assert layers.copies is not None and layers.copies.rows == 1
    store = AdapterStore(tmp_path / "store")
    expected = {}
    for name, (kind, seed) in ADAPTERS.items():
        peft = af.make_peft(reference, kind, tmp_path / name, seed=seed)
        with torch.no_grad():
            expected[name] = peft(input_ids=IDS).logits
        store.add_from_dir("t1", name, tmp_path / name, {})
    manager = AdapterManager(base, layers, store, limits)
    yield base, manager, expected
    manager.close()


async def test_copy_row_is_taken_in_turn_and_reloads_exactly(env):
    base, manager, expected = env
    keys = {name: await manager.prepare("t1", name) for name in ADAPTERS}

    def serve(name: str, release: bool = True) -> int:
        slot = manager.acquire(keys[name])
        assert slot is not None, name
        torch.testing.assert_close(_logits(base.model, slot), expected[name], atol=1e-4, rtol=1e-4)
        if release:
            manager.release(keys[name])
        return slot

    serve("head1")
    serve("plain")
    serve("embed")  # the one row: head1 goes, slot and all
    assert not manager.is_resident("t1", "head1") and manager.is_resident("t1", "plain")
    assert manager.stats()["module_copy_evictions"] == 1 and manager.stats()["module_copies"] == 1

    serve("embed", release=False)  # pinned: its row cannot be taken
    assert manager.acquire(keys["head2"]) is None
    manager.release(keys["embed"])
    serve("head2")
    serve("head1")  # reloaded from the host tier: exact again
    serve("plain")  # untouched by every copy eviction
    assert manager.stats()["module_copy_evictions"] == 3 and manager.stats()["pinned"] == 0


def test_victims_are_least_recent_evictable_holders():
    rows = CopyRows(3)
    a, b, c, d = (AdapterKey("t", n, 1) for n in "abcd")
    rows.take(a, 1)
    rows.take(b, 2)
    assert rows.victims(0, lambda k: True) == [] and rows.used == 3
    assert rows.victims(1, lambda k: True) == [a]
    rows.touch(a)
    assert rows.victims(1, lambda k: True) == [b]
    assert rows.victims(2, lambda k: k != b) is None  # a alone frees 1 row
    assert rows.victims(4, lambda k: True) is None  # more than the pool
    assert rows.victims(1, lambda k: True, first={a}) == [a]  # a forgotten version goes first
    rows.remove(b)
    assert rows.take(c, 2) == (1, 2) and c in rows and d not in rows
