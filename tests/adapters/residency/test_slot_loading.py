"""A device-tier miss through AdapterManager with an asynchronous slot copier.

The copier here is a recording stand-in for the CUDA side stream (the ordering
logic); the numbers go through real slot tensors, real injected layers and
adapters read from PEFT files. What must hold: a slot is handed out only once
its copy has landed (the request waits, the batch does not), the compute side
is ordered after the copy, a slot in flight is never evicted, banks grow only
after the writes in flight, and the values served are the adapter's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.residency.manager import AdapterManager
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.adapters.runtime.transfer import InlineCopier, Stage, storage_bytes, view_in
from server.adapters.store.store import AdapterStore
from tests.adapters import adapter_factory as af

IDS = torch.randint(3, af.VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
KINDS = {"a0": "lora_qv", "a1": "lora_all", "a2": "miss_bat", "big": "miss_balance"}  # big: r=12 on q_proj


class FakeFence:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.landed = log, name, False

    def done(self) -> bool:
        return self.landed

    def order_before_compute(self) -> None:
        self.log.append(f"compute waits {self.name}")


class RecordingCopier:
    """Stands in for StreamCopier: logs the orderings it is asked for; `stage` hands the banks a
    copy of each host tensor (as the device upload would), and fences land only when told."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fences: list[FakeFence] = []
        self.staged = 0

    @contextlib.contextmanager
    def writes(self) -> Iterator[Stage]:
        self.log.append("writes")

        def stage(t: torch.Tensor) -> torch.Tensor:
            self.staged += 1
            return t.clone()

        yield stage
        self.log.append("writes end")

    def fence(self) -> FakeFence:
        fence = FakeFence(self.log, f"f{len(self.fences)}")
        self.fences.append(fence)
        self.log.append(f"fence {fence.name}")
        return fence

    def join(self) -> None:
        self.log.append("join")


def _logits(model, slot: int, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots([slot], ids.shape[1], device=ids.device)):
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """PEFT dirs and each adapter's logits when loaded synchronously (the reference)."""
    tmp = tmp_path_factory.mktemp("loading-src")
    peft_base, ref = af.tiny_base(seed=0), af.tiny_base(seed=0)
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp, max_adapters_resident=1))
    layers = inject_adapter_layers(ref.model, limits, copier=InlineCopier())
    dirs, expected = {}, {}
    for i, (name, kind) in enumerate(KINDS.items()):
        af.make_peft(peft_base, kind, tmp / name, seed=70 + i)
        layers.load_slot(0, read_adapter(tmp / name, ref, limits))
        dirs[name], expected[name] = tmp / name, _logits(ref.model, 0)
    return dirs, expected


@pytest.fixture
def env(files, tmp_path):
    dirs, expected = files
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp_path, max_adapters_resident=1))
    base = af.tiny_base(seed=0)
    copier = RecordingCopier()
    layers = inject_adapter_layers(base.model, limits, copier=copier)
    store = AdapterStore(tmp_path / "store")
    for name, path in dirs.items():
        store.add_from_dir("t1", name, path, {})
    manager = AdapterManager(base, layers, store, limits)
    yield base, manager, copier, expected
    manager.close()


async def test_a_miss_waits_for_its_copy_then_serves_the_adapter(env):
    base, manager, copier, expected = env
    key = await manager.prepare("t1", "a1")
    assert manager.acquire(key) is None, "copy in flight: the request waits, no step reads the slot"
    assert copier.log == ["join", "writes", "writes end", "fence f0"] and copier.staged > 0
    assert manager.acquire(key) is None and manager.stats()["pinned"] == 0
    copier.fences[0].landed = True
    slot = manager.acquire(key)
    assert slot == 0 and copier.log[-1] == "compute waits f0"
    assert manager.stats()["misses"] == 1 and manager.stats()["hits"] == 0  # one miss, no hit for landing
    torch.testing.assert_close(_logits(base.model, slot), expected["a1"], atol=1e-5, rtol=1e-5)
    assert manager.acquire(key) == slot and manager.stats()["hits"] == 1  # now a plain hit
    assert copier.log.count("compute waits f0") == 1


async def test_a_slot_in_flight_is_never_evicted(env):
    _, manager, copier, _ = env
    k0, k1 = await manager.prepare("t1", "a0"), await manager.prepare("t1", "a2")
    assert manager.acquire(k0) is None  # issued, unpinned, in flight
    assert manager.acquire(k1) is None and len(copier.fences) == 1, "k0's slot must not be overwritten"
    copier.fences[0].landed = True  # k0's request went away (cancelled): the landed slot is evictable
    assert manager.acquire(k1) is None and len(copier.fences) == 2 and manager.stats()["evictions"] == 1
    copier.fences[1].landed = True
    assert manager.acquire(k1) == 0


async def test_a_bank_grows_only_after_the_writes_in_flight(env):
    base, manager, copier, expected = env
    small, big = await manager.prepare("t1", "a0"), await manager.prepare("t1", "big")
    assert manager.acquire(small) is None
    assert copier.log[:2] == ["join", "writes"], "empty banks grow (to rank 8) before the writes"
    copier.fences[0].landed = True
    assert manager.acquire(small) == 0
    manager.release(small)
    assert manager.acquire(big) is None
    assert copier.log[copier.log.index("compute waits f0") + 1:][:2] == ["join", "writes"], "q_proj rank 8 -> 16"
    copier.fences[1].landed = True
    slot = manager.acquire(big)
    torch.testing.assert_close(_logits(base.model, slot), expected["big"], atol=1e-5, rtol=1e-5)
    manager.release(big)
    assert manager.acquire(small) is None  # evicts big: ranks fit, so no join, the writes just go
    assert copier.log[copier.log.index("compute waits f1") + 1:] == ["writes", "writes end", "fence f2"]
    copier.fences[2].landed = True
    torch.testing.assert_close(_logits(base.model, manager.acquire(small)), expected["a0"], atol=1e-5, rtol=1e-5)


def test_one_upload_of_an_arena_rebuilds_every_factor(files, tmp_path):
    """StreamCopier's staging: each factor is found again, by offset and strides, in one copy of its
    adapter's whole arena (checked here with the copy on the host). On CPU the arena is not pinned."""
    base = af.tiny_base(seed=0)
    for name in ("a1", "a2"):
        adapter = read_adapter(files[0][name], base, AdapterLimits.from_settings(af.adapter_settings(tmp_path)))
        tensors = [t for w in adapter.modules.values() for t in (w.factors() if w.batched else (w.block,))]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1, "one arena per adapter"
        assert not any(t.is_pinned() for t in tensors)
        whole = storage_bytes(tensors[0]).clone()
        for t in tensors:
            torch.testing.assert_close(view_in(whole, t), t, rtol=0, atol=0)
            torch.testing.assert_close(view_in(whole, t.T), t.T, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_from_pinned_arenas_on_a_side_stream(files, tmp_path):
    dirs, expected = files
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp_path, max_adapters_resident=2))
    base = af.tiny_base(seed=0)
    base.model.to("cuda")
    base = type(base)(model=base.model, tokenizer=None, model_id="tiny", device=torch.device("cuda"),
                      dtype=torch.float32, max_context=512)
    layers = inject_adapter_layers(base.model, limits)
    adapter = read_adapter(dirs["a1"], base, limits)
    assert all(t.is_pinned() for w in adapter.modules.values() for t in w.factors())
    fence = layers.load_slot(1, adapter)
    torch.cuda.synchronize()
    assert fence.done()
    fence.order_before_compute()
    torch.testing.assert_close(_logits(base.model, 1, IDS.cuda()).cpu(), expected["a1"], atol=1e-3, rtol=1e-3)
