"""Mixed batches: base rows and rows of several adapter kinds/ranks in one forward.

Mirrors PEFT's own mixed-batch test (each row of a mixed batch equals that row
run alone with only its adapter), for prefill-shaped inputs (long segments),
decode-shaped inputs with a KV cache (the grouped path), and at the layer level
fast path == plain per-token reference, including bat, embeddings, the merged
seam and the trainer hook.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from tests.adapters import adapter_factory as af
from tests.adapters.layer_reference import reference
from server.adapters.runtime.backend import CpuKernelBackend
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import TRAIN_SLOT, AdapterMapping
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.step import adapter_step

KINDS = ["lora_qv", "lora_all", "lora_embed", "miss_balance", "miss_mini", "miss_bat", "bone"]
BASE = -1


@pytest.fixture(scope="module", params=["cpu-kernel", "torch", "cpu-kernel-f16", "torch-f16"])
def served(request, tmp_path_factory):
    """Every test here runs on both decode paths (compiled CPU kernel, torch bmm), with the slots in
    the model's dtype and in float16 (settings.slot_dtype)."""
    tmp = tmp_path_factory.mktemp("mixed")
    kernel = request.param.startswith("cpu-kernel")
    settings = af.adapter_settings(tmp, max_adapters_resident=len(KINDS), cpu_kernels=kernel,
                                   slot_dtype="float16" if request.param.endswith("f16") else "auto")
    peft_base = af.tiny_base(seed=0)
    ours = af.tiny_base(seed=0)
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    bank = layers["model.layers.0.mlp.up_proj"].bank
    assert isinstance(layers["model.layers.0.mlp.up_proj"].backend, CpuKernelBackend) == kernel
    assert bank.slot_dtype == (torch.float16 if request.param.endswith("f16") else torch.float32)
    for slot, kind in enumerate(KINDS):
        af.make_peft(peft_base, kind, tmp / kind, seed=20 + slot)
        layers.load_slot(slot, read_adapter(tmp / kind, ours, AdapterLimits.from_settings(settings)))
    return ours.model, layers


def _forward(model, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(row_slots, ids.shape[1])):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("length", [12, 5], ids=["prefill-segments", "short-grouped"])
def test_mixed_batch_rows_equal_alone(served, length):
    model, _ = served
    row_slots = [BASE, 0, 1, 2, BASE, 3, 4, 5, 6, 1]
    ids = torch.randint(3, af.VOCAB, (len(row_slots), length), generator=torch.Generator().manual_seed(length))
    batched = _forward(model, ids, row_slots)
    for i, slot in enumerate(row_slots):
        alone = _forward(model, ids[i:i + 1], [slot])
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-4, rtol=1e-4)
    base = _forward(model, ids, [BASE] * len(row_slots))
    for i, slot in enumerate(row_slots):
        changed = bool((batched[i] - base[i]).abs().max() > 1e-3)
        assert changed == (slot != BASE), f"row {i} (slot {slot})"


def _decode(model, ids: torch.Tensor, row_slots: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill then `steps` one-token decode steps through the KV cache; logits of every step."""
    cache = DynamicCache()
    out = []
    with torch.no_grad():
        with adapter_step(AdapterMapping.from_row_slots(row_slots, ids.shape[1])):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits)
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)  # [rows, 1]
            with adapter_step(AdapterMapping.from_row_slots(row_slots, 1)):
                logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits)
    return out


def test_mixed_decode_with_kv_cache_rows_equal_alone(served):
    model, _ = served
    row_slots = [0, BASE, 1, 5, 3, 4, 2, 6]
    ids = torch.randint(3, af.VOCAB, (len(row_slots), 9), generator=torch.Generator().manual_seed(7))
    batched = _decode(model, ids, row_slots, steps=4)
    for i, slot in enumerate(row_slots):
        alone = _decode(model, ids[i:i + 1], [slot], steps=4)
        for step, (b, a) in enumerate(zip(batched, alone)):
            torch.testing.assert_close(b[i:i + 1], a, atol=1e-4, rtol=1e-4, msg=f"row {i} step {step}")


def _mixed_slots(n: int, seed: int) -> list[int]:
    """Token slots with long runs, short runs and base tokens interleaved."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < n:
        slot = int(torch.randint(-1, len(KINDS), (1,), generator=g))
        run = int(torch.randint(1, 12, (1,), generator=g))
        out.extend([slot] * run)
    return out[:n]


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                  "model.layers.0.mlp.up_proj", "model.embed_tokens"])
@pytest.mark.parametrize("shape", [(40,), (3, 16), (32, 1)], ids=["flat", "prefill", "decode"])
def test_fast_path_equals_reference(served, name, shape):
    _, layers = served
    layer = layers[name]
    n = int(torch.tensor(shape).prod())
    mapping = AdapterMapping.from_token_slots(_mixed_slots(n, seed=n + len(name)))
    g = torch.Generator().manual_seed(3)
    if name.endswith("embed_tokens"):
        x = torch.randint(0, layer.num_embeddings, shape, generator=g)
    else:
        x = torch.randn(*shape, layer.in_features, generator=g)
    with torch.no_grad(), adapter_step(mapping):
        fast = layer(x)
    ref = reference(layer, x, mapping)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_sixteen_adapters_decode_grouped_equals_reference(tmp_path):
    """The benchmark's shape, scaled down: 32 decode tokens over 16 resident adapters of mixed ranks."""
    settings = af.adapter_settings(tmp_path, max_adapters_resident=16)
    base = af.tiny_base(seed=0)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    layer = layers["model.layers.1.self_attn.o_proj"]
    from server.adapters.weights.lora import LoraWeights

    g = torch.Generator().manual_seed(5)
    for slot in range(16):
        r = 4 + slot % 3 * 6
        layer.bank.write(slot, LoraWeights(torch.randn(r, 64, generator=g), torch.randn(r, 64, generator=g)))
    slots = [i % 16 for i in range(30)] + [BASE, BASE]
    mapping = AdapterMapping.from_token_slots(slots)
    x = torch.randn(32, 1, 64, generator=g)
    with torch.no_grad(), adapter_step(mapping):
        fast = layer(x)
    torch.testing.assert_close(fast, reference(layer, x, mapping), atol=1e-4, rtol=1e-5)
    assert AdapterBatch.build(mapping).grouped.t_max == 2


def test_merged_seam_uses_merged_weight_without_adapter_math(served):
    _, layers = served
    layer = layers["model.layers.0.self_attn.v_proj"]
    merged = layer.weight + layer.bank.weights[0].delta_weight(layer.weight)
    layer.merged_weights[9] = merged
    try:
        x = torch.randn(2, 5, 64)
        mapping = AdapterMapping.from_row_slots([BASE, BASE], 5, lane=9)
        with torch.no_grad(), adapter_step(mapping):
            got = layer(x)
        torch.testing.assert_close(got, x @ merged.T)
        adapter_mapping = AdapterMapping.from_row_slots([0, 0], 5)
        tol = 1e-5 if layer.bank.slot_dtype == torch.float32 else 1e-3  # merging uses the unrounded host copy
        with torch.no_grad(), adapter_step(adapter_mapping):
            torch.testing.assert_close(layer(x), got, atol=tol, rtol=tol)
    finally:
        del layer.merged_weights[9]


def test_train_hook_adds_trainable_module_on_train_rows_with_gradients(served):
    _, layers = served
    layer = layers["model.layers.0.self_attn.q_proj"]
    trainable = nn.Linear(64, 64, bias=False)
    layer.train_adapter = trainable
    try:
        x = torch.randn(6, 64)
        slots = [TRAIN_SLOT, TRAIN_SLOT, 0, BASE, TRAIN_SLOT, 1]
        mapping = AdapterMapping.from_token_slots(slots)
        with adapter_step(mapping):
            y = layer(x)
        with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots([s if s >= 0 else BASE for s in slots])):
            served_only = layer(x)
        train_rows = torch.tensor([s == TRAIN_SLOT for s in slots])
        expected = served_only + train_rows[:, None] * trainable(x)
        torch.testing.assert_close(y, expected)
        y.sum().backward()
        assert trainable.weight.grad is not None and trainable.weight.grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None
    finally:
        layer.train_adapter = None


def test_train_hook_on_embedding_receives_input_ids(served):
    _, layers = served
    layer = layers["model.embed_tokens"]
    trainable = nn.Embedding(layer.num_embeddings, layer.embedding_dim)
    layer.train_adapter = trainable
    try:
        ids = torch.tensor([[5, 6, 7, 8]])
        mapping = AdapterMapping.from_token_slots([TRAIN_SLOT, BASE, TRAIN_SLOT, 2])
        with adapter_step(mapping):
            y = layer(ids)
        with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots([BASE, BASE, BASE, 2])):
            expected = layer(ids).clone()
        expected[0, [0, 2]] += trainable(torch.tensor([5, 7])).detach()
        torch.testing.assert_close(y.detach(), expected)
        y.sum().backward()
        assert trainable.weight.grad[[5, 7]].abs().sum() > 0 and trainable.weight.grad[6].abs().sum() == 0
    finally:
        layer.train_adapter = None
