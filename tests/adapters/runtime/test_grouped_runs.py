"""The grouped decode path multiplies only the step's active slots, in runs of consecutive slots.

Inactive slots hold (non-zero) adapters here: a bug that multiplied or added
them would change the output, and a bug in the compact block layout would put
a token's row under another slot's weights. Both are checked against the plain
per-token reference.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from tests.adapters.layer_reference import reference
from server.adapters.runtime.backend import CpuKernelBackend
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.weights.lora import LoraWeights
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.step import adapter_step

BASE = -1
ACTIVE = [0, 3, 4, 5, 9, 15]  # runs: [0], [3..5], [9], [15]


@pytest.fixture(scope="module", params=["cpu-kernel", "torch"])
def layers(request, tmp_path_factory):
    """Both decode paths: the compiled CPU kernel (float32 CPU default) and the torch bmm path."""
    settings = af.adapter_settings(tmp_path_factory.mktemp("runs"), max_adapters_resident=16,
                                   cpu_kernels=request.param == "cpu-kernel")
    base = af.tiny_base(seed=0)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    assert isinstance(layers["model.layers.0.mlp.up_proj"].backend, CpuKernelBackend) == (request.param == "cpu-kernel")
    g = torch.Generator().manual_seed(11)
    for name in ("model.layers.0.mlp.up_proj", "model.embed_tokens"):
        layer = layers[name]
        emb = name.endswith("embed_tokens")
        n_in = layer.num_embeddings if emb else layer.in_features
        n_out = layer.embedding_dim if emb else layer.out_features
        for slot in range(16):  # every slot filled, only ACTIVE used below
            r = 4 + slot % 2 * 4
            layer.bank.write(slot, LoraWeights(torch.randn(r, n_in, generator=g),
                                               torch.randn(r, n_out, generator=g), embedding=emb))
    return layers


def _slots(n: int) -> list[int]:
    g = torch.Generator().manual_seed(n)
    choice = ACTIVE + [BASE]
    return [choice[int(i)] for i in torch.randint(0, len(choice), (n,), generator=g)]


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj", "model.embed_tokens"])
def test_scattered_active_slots_equal_reference(layers, name):
    layer = layers[name]
    slots = _slots(40)
    mapping = AdapterMapping.from_token_slots(slots)
    g = torch.Generator().manual_seed(2)
    if name.endswith("embed_tokens"):
        x = torch.randint(0, layer.num_embeddings, (40, 1), generator=g)
    else:
        x = torch.randn(40, 1, layer.in_features, generator=g)
    with torch.no_grad(), adapter_step(mapping):
        fast = layer(x)
    torch.testing.assert_close(fast, reference(layer, x, mapping), atol=1e-4, rtol=1e-5)
    grouped = AdapterBatch.build(mapping).grouped
    present = sorted({s for s in slots if s >= 0})
    assert grouped is not None and grouped.num_slots == len(present)
    assert sum(c for _, c, _ in grouped.runs) == len(present)
    assert [f for f, _, _ in grouped.runs] == [s for s in present if s - 1 not in present]


@pytest.mark.parametrize("slots, identity", [
    ([0, 0, 3, 3, 4, 4, 9, 9], True),  # sorted by slot, equal counts: the layout is the token order
    ([0, 3, 4, 9] * 2, False),  # same tokens per slot, interleaved: gathered
    ([0, 3] * 20, False),  # 20 tokens per slot: the x·Aᵀ shrink (more than LEFT_SHRINK_MAX_T)
    ([0, 3, 4, 5, 9, 15] * 3 + [BASE], False),  # 3 tokens per slot: the A·xᵀ shrink, plus a base-only token
], ids=["identity", "interleaved", "many-per-slot", "few-per-slot"])
def test_grouped_layouts_equal_reference(layers, slots, identity):
    layer = layers["model.layers.0.mlp.up_proj"]
    mapping = AdapterMapping.from_token_slots(slots)
    x = torch.randn(len(slots), layer.in_features, generator=torch.Generator().manual_seed(len(slots)))
    with torch.no_grad(), adapter_step(mapping):
        fast = layer(x)
    torch.testing.assert_close(fast, reference(layer, x, mapping), atol=1e-4, rtol=1e-5)
    grouped = AdapterBatch.build(mapping).grouped
    assert grouped is not None and grouped.identity is identity
