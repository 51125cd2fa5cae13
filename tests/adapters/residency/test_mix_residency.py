"""Per-request mixes through AdapterManager: a virtual adapter cached, slotted and evicted by its recipe.

The real store on disk: a mix is prepared from its members' newest versions, its
key names those versions and weights, so a re-upload of a member makes a new mix
and never serves the stale one; a member the tenant lacks is the same 404 as any
missing adapter; a mix that aged out of the host tier is rebuilt for its request.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.residency.manager import AdapterManager
from server.adapters.residency.recipe import is_mix
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.adapters.store.store import AdapterStore
from server.adapters.weights.mix import MixMember, mix_adapters
from server.errors import AdapterError, NotFound

IDS = torch.randint(3, af.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
SOURCES = {"a": ("lora_qv", 60), "b": ("lora_embed", 61), "a-v2": ("lora_qv", 62), "dora": ("dora_qv", 63)}


def _logits(model, slot: int) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots([slot], IDS.shape[1])):
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """PEFT dirs and the expected logits of the 0.7/0.3 mix of a and b, and of a-v2 with b."""
    tmp = tmp_path_factory.mktemp("mix-src")
    peft_base, ref = af.tiny_base(0), af.tiny_base(0)
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp, max_adapters_resident=1))
    layers = inject_adapter_layers(ref.model, limits)
    for name, (kind, seed) in SOURCES.items():
        af.make_peft(peft_base, kind, tmp / name, seed=seed, scale=0.3)
    expected = {}
    for first in ("a", "a-v2"):
        members = [MixMember(n, read_adapter(tmp / n, ref, limits), w) for n, w in ((first, 0.7), ("b", 0.3))]
        layers.load_slot(0, mix_adapters(members, limits.max_rank))
        expected[first] = _logits(ref.model, 0)
    return tmp, expected


def _manager(tmp_path, files, **settings):
    src, _ = files
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp_path, **{"max_adapters_resident": 2, **settings}))
    base = af.tiny_base(0)
    store = AdapterStore(tmp_path / "store")
    for name in ("a", "b", "dora"):
        store.add_from_dir("t1", name, src / name, {})
    store.add_from_dir("t2", "secret", src / "a", {})
    return base, store, AdapterManager(base, inject_adapter_layers(base.model, limits), store, limits)


async def _acquire(manager, key) -> int:
    for _ in range(300):  # bounded: a host-tier miss re-builds in the background
        slot = manager.acquire(key)
        if slot is not None:
            return slot
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} was never placed")


async def test_a_mix_is_served_and_cached_by_its_recipe(files, tmp_path):
    _, expected = files
    base, _, manager = _manager(tmp_path, files)
    try:
        key = await manager.prepare_mix("t1", [("a", 0.7), ("b", 0.3)])
        assert is_mix(key) and key.tenant == "t1"
        slot = await _acquire(manager, key)
        torch.testing.assert_close(_logits(base.model, slot), expected["a"], atol=1e-5, rtol=1e-5)
        misses = manager.stats()["host_misses"]
        again = await manager.prepare_mix("t1", [("b", 0.3), ("a", 0.7)])  # the same recipe in another order
        assert again == key and manager.stats()["host_misses"] == misses
        assert manager.acquire(key) == slot
        other = await manager.prepare_mix("t1", [("a", 0.3), ("b", 0.7)])  # other weights: another adapter
        assert other != key
        for _ in range(2):
            manager.release(key)
    finally:
        manager.close()


async def test_reupload_of_a_member_makes_a_new_mix(files, tmp_path):
    src, expected = files
    base, store, manager = _manager(tmp_path, files)
    try:
        old = await manager.prepare_mix("t1", [("a", 0.7), ("b", 0.3)])
        old_slot = await _acquire(manager, old)  # a running request holds the old mix
        store.add_from_dir("t1", "a", src / "a-v2", {})
        manager.forget("t1", "a")
        new = await manager.prepare_mix("t1", [("a", 0.7), ("b", 0.3)])
        assert new != old
        new_slot = await _acquire(manager, new)
        torch.testing.assert_close(_logits(base.model, new_slot), expected["a-v2"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_logits(base.model, old_slot), expected["a"], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected["a"], expected["a-v2"])
        manager.release(old)  # forgotten with its member: its slot is freed as soon as it is unpinned
        assert manager.stats()["resident"] == 1
        manager.release(new)
    finally:
        manager.close()


async def test_a_missing_or_foreign_member_is_the_same_404(files, tmp_path):
    _, _, manager = _manager(tmp_path, files)
    try:
        messages = []
        for absent in ("nope", "secret"):  # "secret" is t2's
            with pytest.raises(NotFound) as err:
                await manager.prepare_mix("t1", [("a", 0.5), (absent, 0.5)])
            messages.append(err.value.message.replace(absent, "X"))
        with pytest.raises(NotFound) as plain:
            await manager.prepare("t1", "nope")
        assert messages[0] == messages[1] == plain.value.message.replace("nope", "X")
    finally:
        manager.close()


async def test_refusals_reach_the_caller(files, tmp_path):
    _, _, manager = _manager(tmp_path, files, max_rank=12)
    try:
        with pytest.raises(AdapterError, match="summed rank is 16"):
            await manager.prepare_mix("t1", [("a", 0.5), ("b", 0.5)])
        with pytest.raises(AdapterError, match="DoRA adapter"):
            await manager.prepare_mix("t1", [("a", 0.5), ("dora", 0.5)])
        assert await manager.prepare_mix("t1", [("a", 2.0)])  # one member with a weight is a mix too
    finally:
        manager.close()


async def test_a_mix_that_left_the_host_tier_is_rebuilt(files, tmp_path):
    _, expected = files
    base, _, manager = _manager(tmp_path, files, max_adapters_host=2)
    try:
        key = await manager.prepare_mix("t1", [("a", 0.7), ("b", 0.3)])
        await manager.prepare("t1", "dora")
        await manager.prepare_mix("t1", [("a", 0.1)])  # the host tier (2) no longer holds the first mix
        assert key not in manager.host
        slot = await _acquire(manager, key)
        torch.testing.assert_close(_logits(base.model, slot), expected["a"], atol=1e-5, rtol=1e-5)
        manager.release(key)
    finally:
        manager.close()


async def test_recipes_remembered_are_bounded(files, tmp_path):
    """Endless distinct weights must not grow the manager without bound: past 8 recipes per host entry the
    oldest ones with no copy in a tier are forgotten, and asking again rebuilds the same mix."""
    from server.adapters.residency.manager import MIX_RECIPES_PER_HOST_ENTRY

    _, expected = files
    base, _, manager = _manager(tmp_path, files, max_adapters_host=2)
    try:
        cap = MIX_RECIPES_PER_HOST_ENTRY * 2
        first = await manager.prepare_mix("t1", [("a", 0.7), ("b", 0.3)])
        for i in range(cap + 4):
            await manager.prepare_mix("t1", [("a", 0.01 * (i + 1))])
            assert manager.stats()["mix_recipes"] <= cap
        assert await manager.prepare_mix("t1", [("a", 0.7), ("b", 0.3)]) == first
        slot = await _acquire(manager, first)
        torch.testing.assert_close(_logits(base.model, slot), expected["a"], atol=1e-5, rtol=1e-5)
        manager.release(first)
    finally:
        manager.close()
