"""The merge path below HTTP: merged copies equal unmerged serving, and the registry's lifecycle.

Every adapter kind is written by PEFT with non-zero random weights, read by our
validator, and served two ways on the same tiny Llama: unmerged through its
device slot, and merged through a copy built by `build_merged_copy`. Logits
must agree to 1e-4 (float32) and greedy tokens exactly. The registry tests run
without an engine loop (its step hook then runs inline) on the real store.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.weights.lora import LoraWeights, write_scaled_bt
from server.adapters.merge.merge import MARKER, MergeRegistry
from server.adapters.merge.merged_copy import UnsafeMerge, build_merged_copy, install, merged_weight
from server.adapters.peft.peft_format import read_adapter
from server.adapters.store.store import AdapterStore
from server.adapters.types import AdapterKey
from server.errors import AdapterError, ApiError, Conflict
from server.metrics import Metrics

LANE0 = 100


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Each kind loaded into a slot of one model and, as a merged copy, into lane LANE0 + slot."""
    tmp = tmp_path_factory.mktemp("merge-zoo")
    settings = af.adapter_settings(tmp, max_adapters_resident=len(af.ALL_KINDS))
    peft_base, ours = af.tiny_base(seed=0), af.tiny_base(seed=0)
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    adapters, copies = {}, {}
    for slot, kind in enumerate(af.ALL_KINDS):
        af.make_peft(peft_base, kind, tmp / kind, seed=20 + slot)
        adapters[kind] = read_adapter(tmp / kind, ours, AdapterLimits.from_settings(settings))
        layers.load_slot(slot, adapters[kind])
        copies[kind] = build_merged_copy(layers, adapters[kind], AdapterKey("t", kind.replace("_", "-"), 1),
                                         LANE0 + slot)
        install(layers, copies[kind])
    return ours, layers, adapters, copies


@pytest.mark.parametrize("kind", af.ALL_KINDS)
def test_merged_logits_equal_unmerged(zoo, kind):
    ours, _, _, copies = zoo
    slot = af.ALL_KINDS.index(kind)
    ids = af.token_ids(11)
    unmerged = af.logits_under(ours.model, ids, slot)
    merged = af.logits_under(ours.model, ids, -1, lane=copies[kind].lane)
    base = af.logits_under(ours.model, ids, -1)
    assert (unmerged - base).abs().max() > 1e-2, "the adapter must change the output for this test to mean anything"
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", af.ALL_KINDS)
def test_merged_greedy_tokens_equal_unmerged(zoo, kind):
    ours, _, _, copies = zoo
    slot = af.ALL_KINDS.index(kind)
    ids = af.token_ids(12, length=5)
    unmerged = af.greedy_under(ours.model, ids, slot, steps=10)
    merged = af.greedy_under(ours.model, ids, -1, steps=10, lane=copies[kind].lane)
    assert merged.tolist() == unmerged.tolist()


def test_only_adapted_modules_are_copied(zoo):
    _, layers, adapters, copies = zoo
    for kind, copy in copies.items():
        assert set(copy.weights) == set(adapters[kind].modules)
        assert copy.nbytes == sum(layers[n].weight.numel() * layers[n].weight.element_size() for n in copy.weights)
        for name in layers.layers:
            installed = layers[name].merged_weights.get(copy.lane)
            if name in copy.weights:
                assert installed is copy.weights[name]
                assert installed.data_ptr() != layers[name].weight.data_ptr()
            else:
                assert installed is None  # untouched modules read the base itself
    assert copies["lora_embed"].weights.keys() >= {"model.embed_tokens"}


def _lora(out_f: int = 64, in_f: int = 48, r: int = 8, scale: float = 2.0, magnitude: float = 0.1,
          dtype: torch.dtype = torch.float32) -> LoraWeights:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(r, in_f, generator=g) * magnitude, torch.randn(out_f, r, generator=g) * magnitude
    bt = torch.empty(r, out_f, dtype=dtype)
    write_scaled_bt(b, scale, bt)  # as the loader holds PEFT's B: scaled in float32, transposed, then cast
    return LoraWeights(a.to(dtype), bt)


def test_merge_is_computed_in_float32_and_cast_once():
    base = (torch.randn(64, 48, generator=torch.Generator().manual_seed(4)) * 0.05).to(torch.bfloat16)
    lora = _lora(dtype=torch.bfloat16)
    got = merged_weight(base, lora, "m")
    truth = base.float() + lora.bt.float().T @ lora.a.float()  # [out, in]
    assert got.dtype == torch.bfloat16 and torch.equal(got, truth.to(torch.bfloat16))
    naive = base + lora.delta_weight(base)  # the delta rounded to bf16 first, then a bf16 add
    assert (got.float() - truth).abs().sum() < (naive.float() - truth).abs().sum()


@pytest.mark.parametrize("column_major", [False, True])
def test_merged_weight_keeps_the_base_layout(column_major: bool):
    """On CPU the base's Linear weights are column-major (model/load.py); a row-major merged copy would run
    the merged lane's matmuls slower than the base's, which is what a dedicated tenant pays to avoid."""
    base = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    if column_major:
        base = base.t().contiguous().t()
    got = merged_weight(base, _lora(), "m")
    assert got.stride() == base.stride()
    assert torch.equal(got, base.contiguous() + _lora().delta_weight(base.contiguous()))


def test_nan_or_inf_merge_is_refused():
    with pytest.raises(UnsafeMerge, match="safe merge"):
        merged_weight(torch.zeros(64, 48), _lora(magnitude=1e25), "layers.0.q_proj")  # ΔW overflows float32
    with pytest.raises(UnsafeMerge, match="float16"):  # finite in float32, Inf once cast to the serving dtype
        merged_weight(torch.zeros(64, 48, dtype=torch.float16), _lora(magnitude=300.0), "layers.0.q_proj")


# --- the registry ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge-src")
    peft_base = af.tiny_base(seed=0)
    dirs = {name: tmp / name for name in ("qv", "qv2", "bat", "huge")}
    af.make_peft(peft_base, "lora_qv", dirs["qv"], seed=1)
    af.make_peft(peft_base, "lora_all", dirs["qv2"], seed=2)
    af.make_peft(peft_base, "miss_bat", dirs["bat"], seed=3)
    af.make_peft(peft_base, "lora_qv", dirs["huge"], seed=4, scale=1e25)  # finite, but ΔW overflows
    return dirs


@pytest.fixture
def registry(sources, tmp_path):
    settings = af.adapter_settings(tmp_path, max_merged=2)
    base = af.tiny_base(seed=0)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    store = AdapterStore(tmp_path / "store")
    for name, path in sources.items():
        store.add_from_dir("acme", name, path, {})
    metrics = Metrics()
    # no engine: the step hook runs inline
    reg = MergeRegistry(base, layers, store, AdapterLimits.from_settings(settings), metrics)
    yield reg, store, layers, metrics
    reg.close()


def _installed(layers) -> set[int]:
    return {lane for name in layers.layers for lane in layers[name].merged_weights}


async def test_dedicate_publishes_one_copy_per_adapter(registry):
    reg, store, layers, metrics = registry
    key = store.resolve("acme", "qv").key
    assert await reg.dedicate("acme", "qv") is True
    lane = reg.lane_of(key)
    assert lane is not None and reg.is_merged("acme", "qv") and not reg.is_merged("acme", "bat")
    assert _installed(layers) == {lane}
    assert (store.adapter_dir("acme", "qv") / MARKER).is_file()
    assert await reg.dedicate("acme", "qv") is False  # idempotent: no second copy
    stats = reg.stats()
    assert stats["copies"] == 1 and stats["bytes"] > 0
    assert metrics.merged_copies._value.get() == 1 and metrics.merged_bytes._value.get() == stats["bytes"]
    await reg.undedicate("acme", "qv")
    assert reg.lane_of(key) is None and not reg.is_merged("acme", "qv")
    assert _installed(layers) == set() and reg.stats()["copies"] == 0  # nothing running in the lane: dropped
    assert not (store.adapter_dir("acme", "qv") / MARKER).exists()
    assert metrics.merged_bytes._value.get() == 0


async def test_cap_is_a_conflict(registry):
    reg, *_ = registry
    await reg.dedicate("acme", "qv")
    await reg.dedicate("acme", "bat")
    with pytest.raises(Conflict, match="max_merged is 2"):
        await reg.dedicate("acme", "qv2")
    await reg.undedicate("acme", "bat")
    assert await reg.dedicate("acme", "qv2") is True


async def test_refused_merge_leaves_nothing(registry):
    reg, store, layers, metrics = registry
    with pytest.raises(AdapterError, match="safe merge"):
        await reg.dedicate("acme", "huge")
    assert reg.stats() == {"dedicated": 0, "copies": 0, "bytes": 0, "draining": 0, "pending": 0}
    assert _installed(layers) == set() and not reg.is_merged("acme", "huge")
    assert not (store.adapter_dir("acme", "huge") / MARKER).exists()


async def test_new_version_gets_its_own_copy(registry, sources):
    reg, store, layers, _ = registry
    await reg.dedicate("acme", "qv")
    v1 = store.resolve("acme", "qv").key
    lane1 = reg.lane_of(v1)
    v2 = store.add_from_dir("acme", "qv", sources["qv2"], {}).ref.key
    assert not reg.is_merged("acme", "qv") or reg.lane_of(v2) is None  # v2 is not served by v1's copy
    await reg.refresh("acme", "qv")
    lane2 = reg.lane_of(v2)
    assert lane2 is not None and lane2 != lane1 and reg.lane_of(v1) is None
    assert reg.is_merged("acme", "qv") and _installed(layers) == {lane2}  # v1's copy had no running requests


async def test_version_published_elsewhere_is_noticed(registry, sources):
    """A training job publishes through the store, not the upload route: the first sight of v2 rebuilds."""
    reg, store, layers, _ = registry
    await reg.dedicate("acme", "bat")
    v2 = store.add_from_dir("acme", "bat", sources["qv2"], {}).ref.key
    assert reg.lane_of(v2) is None  # this request runs unmerged (correct), and v2's copy starts building
    assert not reg.is_merged("acme", "bat", version=2)
    for _ in range(500):
        if reg.is_merged("acme", "bat", version=2):
            break
        await asyncio.sleep(0.01)
    assert reg.lane_of(v2) is not None and _installed(layers) == {reg.lane_of(v2)}


async def test_dedication_survives_a_restart(registry, sources, tmp_path):
    reg, store, _, _ = registry
    await reg.dedicate("acme", "bat")
    settings = af.adapter_settings(tmp_path, max_merged=2)
    base = af.tiny_base(seed=0)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    again = MergeRegistry(base, layers, AdapterStore(tmp_path / "store"), AdapterLimits.from_settings(settings))
    try:
        again.restore()
        key = store.resolve("acme", "bat").key
        for _ in range(500):
            if again.lane_of(key) is not None:
                break
            await asyncio.sleep(0.01)
        assert again.lane_of(key) is not None and again.is_merged("acme", "bat")
    finally:
        again.close()
    reg.forget("acme", "bat")  # a delete un-dedicates for good
    assert not (store.adapter_dir("acme", "bat") / MARKER).exists() and not reg.is_merged("acme", "bat")


def test_bf16_model_merges_the_files_unrounded_float32_factors(tmp_path):
    """A bfloat16 base: the host copy keeps the file's float32 factors (B·s scaled in float32), the slots
    round once to bf16, and the merged weight is round(W + ΔW) of the unrounded factors."""
    settings = af.adapter_settings(tmp_path, max_adapters_resident=1)
    af.make_peft(af.tiny_base(seed=0), "lora_all", tmp_path / "a", seed=3)
    ours = af.tiny_base(seed=0)
    ours.model.to(torch.bfloat16)
    ours.dtype = torch.bfloat16
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    adapter = read_adapter(tmp_path / "a", ours, AdapterLimits.from_settings(settings))
    name = "model.layers.0.self_attn.q_proj"
    lora = adapter.modules[name]
    assert isinstance(lora, LoraWeights) and lora.a.dtype == torch.float32 and lora.bt.dtype == torch.float32
    layers.load_slot(0, adapter)
    bank = layers[name].bank
    assert bank.a.dtype == torch.bfloat16 and torch.equal(bank.a[0, :lora.rank], lora.a.to(torch.bfloat16))
    weight = layers[name].weight
    got = build_merged_copy(layers, adapter, AdapterKey("t", "a", 1), LANE0).weights[name]
    assert torch.equal(got, (weight.float() + lora.bt.T @ lora.a).to(torch.bfloat16))


@pytest.mark.parametrize("race", ["reupload", "delete"])
async def test_a_merge_racing_a_reupload_or_delete_says_what_happened(sources, tmp_path, race):
    """The version's files leave the store between resolving and reading it: 409 / 404, not a 422 lie."""

    class RacingStore(AdapterStore):
        """A real store where the other request lands right after the merge resolved its version."""

        armed = True

        def resolve(self, tenant, adapter_id):
            ref = super().resolve(tenant, adapter_id)
            if self.armed:
                self.armed = False
                if race == "reupload":
                    self.add_from_dir(tenant, adapter_id, sources["qv2"], {})
                else:
                    self.delete(tenant, adapter_id)
                self.collect_garbage(lambda key: False)
            return ref

    settings = af.adapter_settings(tmp_path, max_merged=2)
    base = af.tiny_base(seed=0)
    store = RacingStore(tmp_path / "store")
    store.armed = False
    store.add_from_dir("acme", "qv", sources["qv"], {})
    store.armed = True
    limits = AdapterLimits.from_settings(settings)
    reg = MergeRegistry(base, inject_adapter_layers(base.model, limits), store, limits, Metrics())
    try:
        with pytest.raises(ApiError) as caught:
            await reg.dedicate("acme", "qv")
    finally:
        reg.close()
    error = caught.value
    if race == "reupload":
        assert error.status == 409 and "replaced (version 2)" in error.message, error.message
    else:
        assert error.status == 404 and error.message == "adapter 'qv' not found", error.message
    assert not reg.is_merged("acme", "qv")
