"""Merging onto a quantized base is refused (409, the reason named); the adapter stays served unmerged."""

from __future__ import annotations

import pytest

from tests.adapters import adapter_factory as af
from tests.quantized_base import ours, save_tiny
from server.adapters.limits import AdapterLimits
from server.adapters.merge.merge import MARKER, MergeRegistry
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.store.store import AdapterStore
from server.errors import Conflict, NotFound


@pytest.fixture(params=["int8", "nf4"])
def quantized_registry(request, tmp_path):
    path = save_tiny(tmp_path / "model")
    plain_base = af.tiny_base(0)
    af.make_peft(plain_base, "lora_qv", tmp_path / "qv", seed=1)
    base = ours(path, request.param)
    settings = af.adapter_settings(tmp_path, max_merged=2)
    limits = AdapterLimits.from_settings(settings)
    layers = inject_adapter_layers(base.model, limits)
    store = AdapterStore(tmp_path / "store")
    store.add_from_dir("acme", "qv", tmp_path / "qv", {})
    reg = MergeRegistry(base, layers, store, limits)
    yield reg, store, layers, base, limits
    reg.close()


async def test_dedicate_on_a_quantized_base_is_a_conflict_naming_why(quantized_registry):
    reg, store, layers, _, _ = quantized_registry
    mode = reg.base.quantize
    with pytest.raises(Conflict, match=rf"base model is quantized \({mode} weight-only\).*served unmerged") as e:
        await reg.dedicate("acme", "qv")
    assert e.value.status == 409
    assert reg.stats() == {"dedicated": 0, "copies": 0, "bytes": 0, "draining": 0, "pending": 0}
    assert not any(layers[name].merged_weights for name in layers.layers)
    assert not (store.adapter_dir("acme", "qv") / MARKER).exists()
    with pytest.raises(NotFound):  # an unknown adapter is still a 404, not the quantization refusal
        await reg.dedicate("acme", "nope")


async def test_restore_on_a_quantized_base_skips_and_keeps_the_marker(quantized_registry):
    """A dedication made on the plain base survives a quantized run, for the next plain one."""
    reg, store, _, _, _ = quantized_registry
    marker = store.adapter_dir("acme", "qv") / MARKER
    marker.touch()
    reg.restore()
    assert reg.stats()["dedicated"] == 0 and not reg.is_merged("acme", "qv")
    assert marker.is_file()
