"""The two-tier cache through AdapterManager, with the real AdapterStore on disk.

2 device slots, 6 adapters of mixed kinds: evictions happen, pinned adapters are
never evicted (their outputs stay right), acquire says None when every slot is
pinned, one bad file fails only its own key, and a new version is never served
from a stale cache entry.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.residency.manager import AdapterManager
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.step import adapter_step
from server.adapters.store.store import AdapterStore
from server.errors import AdapterError, NotFound
from server.metrics import Metrics

KINDS = ["lora_qv", "miss_mini", "lora_all", "bone", "miss_bat", "lora_embed"]
IDS = torch.randint(3, af.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


def _logits(model, slot: int) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots([slot], IDS.shape[1])):
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """PEFT dirs for 6 adapters (+ a second version of a0) and each one's expected logits."""
    tmp = tmp_path_factory.mktemp("cache-src")
    peft_base = af.tiny_base(seed=0)
    ref = af.tiny_base(seed=0)
    one_slot = AdapterLimits.from_settings(af.adapter_settings(tmp, max_adapters_resident=1))
    layers = inject_adapter_layers(ref.model, one_slot)
    settings = af.adapter_settings(tmp)
    dirs, expected = {}, {}
    for i, kind in enumerate(KINDS + ["lora_qv"]):
        name = f"a{i}" if i < len(KINDS) else "a0-v2"
        af.make_peft(peft_base, kind, tmp / name, seed=40 + i)
        layers.load_slot(0, read_adapter(tmp / name, ref, AdapterLimits.from_settings(settings)))
        dirs[name], expected[name] = tmp / name, _logits(ref.model, 0)
    return dirs, expected


@pytest.fixture
def env(files, tmp_path):
    dirs, expected = files
    settings = af.adapter_settings(tmp_path, max_adapters_resident=2, max_adapters_host=8)
    base = af.tiny_base(seed=0)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    store = AdapterStore(tmp_path / "store")
    for i in range(len(KINDS)):
        store.add_from_dir("t1", f"a{i}", dirs[f"a{i}"], {})
    metrics = Metrics()
    manager = AdapterManager(base, layers, store, AdapterLimits.from_settings(settings), metrics=metrics)
    yield base, manager, store, dirs, expected, metrics
    manager.close()


async def test_evictions_pins_and_correct_outputs(env):
    base, manager, _, _, expected, _ = env
    keys = [await manager.prepare("t1", f"a{i}") for i in range(6)]
    held = manager.acquire(keys[0])  # pinned through the whole test
    assert held is not None
    for round_ in range(2):
        for i in range(1, 6):
            slot = manager.acquire(keys[i])
            assert slot is not None and slot != held
            torch.testing.assert_close(_logits(base.model, slot), expected[f"a{i}"], atol=1e-5, rtol=1e-5)
            manager.release(keys[i])
            torch.testing.assert_close(_logits(base.model, held), expected["a0"], atol=1e-5, rtol=1e-5)
    stats = manager.stats()
    assert stats["evictions"] >= 9 and stats["pinned"] == 1 and stats["resident"] == 2
    assert manager.acquire(keys[0]) == held  # a hit: same slot, second pin
    assert manager.stats()["hits"] >= 1
    manager.release(keys[0])
    manager.release(keys[0])
    assert manager.stats()["pinned"] == 0


async def test_acquire_returns_none_when_every_slot_is_pinned(env):
    _, manager, _, _, _, _ = env
    k0, k1, k2 = [await manager.prepare("t1", f"a{i}") for i in range(3)]
    s0, s1 = manager.acquire(k0), manager.acquire(k1)
    assert {s0, s1} == {0, 1}
    assert manager.acquire(k2) is None  # waits; nothing pinned was evicted
    assert manager.acquire(k0) == s0 and manager.acquire(k1) == s1
    manager.release(k1)
    assert manager.acquire(k2) is None  # k1 is still pinned once
    manager.release(k1)
    assert manager.acquire(k2) == s1  # now k1's slot is free to evict
    assert manager.stats()["evictions"] == 1


async def test_concurrent_prepares_share_one_load(env):
    _, manager, _, _, _, _ = env
    calls = []
    real = manager._loader

    def counting(*args):
        calls.append(threading.get_ident())
        return real(*args)

    manager._loader = counting
    keys = await asyncio.gather(*[manager.prepare("t1", "a2") for _ in range(6)])
    assert len(set(keys)) == 1 and len(calls) == 1
    await manager.prepare("t1", "a2")
    assert len(calls) == 1 and manager.stats()["host_hits"] >= 1


def _add_bad_adapter(store: AdapterStore, dirs: dict) -> None:
    """Adapter id "bad": a0's files with every value NaN (made once per module)."""
    bad = dirs["a0"].parent / "bad"
    if not bad.exists():
        shutil.copytree(dirs["a0"], bad)
        af.edit_tensors(bad, lambda t: {k: v * float("nan") for k, v in t.items()})
    store.add_from_dir("t1", "bad", bad, {})


async def test_bad_adapter_fails_alone(env):
    _, manager, store, dirs, _, _ = env
    _add_bad_adapter(store, dirs)
    good = await manager.prepare("t1", "a1")
    with pytest.raises(AdapterError, match="NaN or Inf"):
        await manager.prepare("t1", "bad")
    with pytest.raises(AdapterError, match="NaN or Inf"):  # remembered: the version is immutable
        await manager.prepare("t1", "bad")
    with pytest.raises(NotFound):
        await manager.prepare("t1", "missing")
    assert manager.acquire(good) is not None


async def test_new_version_is_never_served_from_a_stale_cache(env):
    base, manager, store, dirs, expected, _ = env
    old = await manager.prepare("t1", "a0")
    slot = manager.acquire(old)
    torch.testing.assert_close(_logits(base.model, slot), expected["a0"], atol=1e-5, rtol=1e-5)
    store.add_from_dir("t1", "a0", dirs["a0-v2"], {})  # re-upload while a request holds v1
    manager.forget("t1", "a0")
    new = await manager.prepare("t1", "a0")
    assert new.version == old.version + 1
    new_slot = manager.acquire(new)
    assert new_slot is not None and new_slot != slot
    torch.testing.assert_close(_logits(base.model, new_slot), expected["a0-v2"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(base.model, slot), expected["a0"], atol=1e-5, rtol=1e-5)  # v1 finishes
    manager.release(old)  # forgotten and unpinned: its slot is freed at once
    assert manager.stats()["resident"] == 1 and manager.is_resident("t1", "a0")
    queued = manager.acquire(old)  # a request that prepared v1 before the re-upload still runs on v1
    assert queued is not None
    torch.testing.assert_close(_logits(base.model, queued), expected["a0"], atol=1e-5, rtol=1e-5)
    manager.release(old)


def _small_host_tier(files, tmp_path, adapters: int) -> tuple:
    """(base, store, manager): 2 device slots, a host tier of 2, `adapters` LoRA/MiSS ids a0.. in the store."""
    dirs, _ = files
    settings = af.adapter_settings(tmp_path, max_adapters_resident=2, max_adapters_host=2)
    base = af.tiny_base(seed=0)
    store = AdapterStore(tmp_path / "store")
    for i in range(adapters):
        store.add_from_dir("t1", f"a{i}", dirs[f"a{i}"], {})
    limits = AdapterLimits.from_settings(settings)
    return base, store, AdapterManager(base, inject_adapter_layers(base.model, limits), store, limits)


async def test_host_tier_eviction_reloads_in_background(files, tmp_path):
    dirs, expected = files
    base, store, manager = _small_host_tier(files, tmp_path, adapters=3)
    try:
        keys = [await manager.prepare("t1", f"a{i}") for i in range(3)]  # a0 falls out of the host tier
        assert manager.stats()["host_evictions"] == 1
        slot = manager.acquire(keys[0])
        for _ in range(200):
            if slot is not None:
                break
            await asyncio.sleep(0.01)
            slot = manager.acquire(keys[0])
        assert slot is not None
        torch.testing.assert_close(_logits(base.model, slot), expected["a0"], atol=1e-5, rtol=1e-5)
    finally:
        manager.close()


async def test_a_reread_that_fails_on_the_file_system_fails_the_waiting_request(files, tmp_path):
    """Fell out of the host tier, then its files became unreadable: acquire must raise once the re-read
    failed, not submit a new read every step while the request waits forever."""
    base, store, _ = _small_host_tier(files, tmp_path, adapters=3)
    settings = af.adapter_settings(tmp_path, max_adapters_resident=2, max_adapters_host=2)
    broken: set[str] = set()
    reads: list[str] = []

    def loader(path, base_, settings_):
        reads.append(path.parent.name)
        if path.parent.name in broken:
            raise PermissionError(13, "Permission denied")
        return read_adapter(path, base_, settings_)

    limits = AdapterLimits.from_settings(settings)
    manager = AdapterManager(base, inject_adapter_layers(base.model, limits), store, limits, loader=loader)
    try:
        keys = [await manager.prepare("t1", f"a{i}") for i in range(3)]  # a0 falls out of the host tier
        broken.add("a0")
        reads.clear()
        with pytest.raises(AdapterError, match="could not be read: Permission denied"):
            for _ in range(200):
                assert manager.acquire(keys[0]) is None
                await asyncio.sleep(0.01)
        assert reads == ["a0"], "one re-read, then the request fails"
        broken.clear()
        assert await manager.prepare("t1", "a0") == keys[0]  # readable again: a new request reads it
        assert manager.acquire(keys[0]) is not None
    finally:
        manager.close()


async def test_prepare_grows_the_slot_banks_so_placement_does_not(files, tmp_path):
    """The banks' first allocation (or a growth) happens in prepare, on a loader thread: placing the adapter
    on the engine thread then only swaps the reserved tensors in and copies the factors."""
    dirs, expected = files
    base, store, manager = _small_host_tier(files, tmp_path, adapters=1)
    try:
        key = await manager.prepare("t1", "a0")
        adapter = manager.host.get(key)
        banks = {name: manager.layers[name].bank for name in adapter.modules}
        reserved = {name: bank._pending for name, bank in banks.items()}
        assert all(r is not None for r in reserved.values()) and all(b.a is None for b in banks.values())
        assert not manager.layers.needs_growth(adapter), "reserved: a second prepare would not allocate again"
        slot = manager.acquire(key)
        assert slot is not None
        assert all(bank.a is reserved[name][0] and bank.bt is reserved[name][1] for name, bank in banks.items())
        torch.testing.assert_close(_logits(base.model, slot), expected["a0"], atol=1e-5, rtol=1e-5)
        manager.release(key)
        await manager.prepare("t1", "a0")  # resident: nothing to reserve
        assert all(bank._pending is None for bank in banks.values())
    finally:
        manager.close()


async def test_metrics_are_counted(env):
    _, manager, _, _, _, metrics = env
    keys = [await manager.prepare("t1", f"a{i}") for i in range(3)]
    for k in keys:
        manager.acquire(k)
        manager.release(k)
    manager.acquire(keys[2])
    sample = metrics.registry.get_sample_value
    assert sample("loraplex_adapter_cache_misses_total", {"tier": "device"}) == 3
    assert sample("loraplex_adapter_cache_hits_total", {"tier": "device"}) == 1
    assert sample("loraplex_adapter_cache_evictions_total", {"tier": "device"}) == 1
    assert sample("loraplex_adapters_resident") == 2


def _newest_first(store: AdapterStore, order: list[str]) -> None:
    """Give the store's versions mtimes so that `order` is newest first."""
    now = time.time()
    for age, adapter_id in enumerate(order):
        path = store.resolve("t1", adapter_id).path
        os.utime(path, (now - 10 * age, now - 10 * age))


async def test_prefetch_warms_the_host_tier_newest_first_and_skips_bad_files(env):
    base, manager, store, dirs, expected, metrics = env
    _add_bad_adapter(store, dirs)
    assert manager.prefetch(store.newest_first).result(timeout=60) == len(KINDS)  # the bad one is skipped
    stats = manager.stats()
    assert stats["host_entries"] == len(KINDS) and stats["resident"] == 0  # host tier only
    assert metrics.registry.get_sample_value("loraplex_adapter_load_seconds_count", {"tier": "host"}) == len(KINDS)
    calls = []
    real = manager._loader
    manager._loader = lambda *args: calls.append(args) or real(*args)
    key = await manager.prepare("t1", "a4")
    slot = manager.acquire(key)
    assert calls == [] and slot is not None  # no disk read: served from the warmed tier
    torch.testing.assert_close(_logits(base.model, slot), expected["a4"], atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterError, match="NaN or Inf"):  # refused when requested, as without prefetch
        await manager.prepare("t1", "bad")


async def test_prefetch_stops_when_the_host_tier_is_full(files, tmp_path):
    _, store, manager = _small_host_tier(files, tmp_path, adapters=4)
    _newest_first(store, ["a2", "a0", "a3", "a1"])
    try:
        assert [r.key.adapter_id for r in store.newest_first()] == ["a2", "a0", "a3", "a1"]
        assert manager.prefetch(store.newest_first).result(timeout=60) == 2
        stats = manager.stats()
        assert stats["host_entries"] == 2 and stats["host_evictions"] == 0
        assert all(manager.host.get(store.resolve("t1", a).key) is not None for a in ("a2", "a0"))
    finally:
        manager.close()


async def test_pin_without_a_slot_guards_the_version_and_takes_no_slot(env):
    _, manager, _, _, _, _ = env
    keys = [await manager.prepare("t1", f"a{i}") for i in range(3)]
    manager.pin(keys[2])  # a request on a merged lane
    assert manager.is_pinned(keys[2]) and manager.stats()["resident"] == 0
    assert manager.acquire(keys[0]) is not None and manager.acquire(keys[1]) is not None  # both slots still free
    manager.release(keys[2])
    assert not manager.is_pinned(keys[2])
