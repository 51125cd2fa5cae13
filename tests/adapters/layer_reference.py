"""The plain per-token version of the adapter layers' math: the oracle the batched paths are tested against.

Each token goes through `W + ΔW` of its own adapter, built from the slot bank's
host copies of the weights, one row at a time: nothing shared with the
backends (backend.py) but the weights themselves.
"""

from __future__ import annotations

import dataclasses

import torch

from server.adapters.runtime.layers import AdaptedEmbedding, AdaptedModule
from server.adapters.weights.loaded import ModuleWeights
from server.adapters.weights.lora import LoraWeights
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.slots import SlotBank


def reference(layer: AdaptedModule, x: torch.Tensor, mapping: AdapterMapping) -> torch.Tensor:
    """`layer(x)` under `mapping`, token by token (Linear: x `[..., in]`; Embedding: ids `[...]`), in float32
    and rounded once to the model's dtype (a no-op for a float32 model)."""
    embedding = isinstance(layer, AdaptedEmbedding)
    x2 = x.reshape(-1) if embedding else x.reshape(-1, x.shape[-1])  # [tokens] ids | [tokens, in]
    weight = layer.base_layer.weight
    rows = []
    for t, slot in enumerate(mapping.token_slots.tolist()):
        w = weight
        if mapping.lane is not None:
            w = layer.merged_weights.get(mapping.lane, weight)
        elif slot >= 0 and (host := layer.bank.weights[slot]) is not None:
            wide = weight.float()
            w = wide + _rounded_to_slots(host, layer.bank).delta_weight(wide)
        rows.append((w[x2[t]] if embedding else _linear_row(layer, x2[t], w)).to(weight.dtype))
    out = torch.stack(rows)  # [tokens, out]
    return out.view(*x.shape[: x.dim() - (0 if embedding else 1)], -1)


def _linear_row(layer: AdaptedModule, x_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    y = x_row.to(weight.dtype) @ weight.T
    bias = layer.base_layer.bias
    return y if bias is None else y + bias.to(weight.dtype)


def _rounded_to_slots(weights: ModuleWeights, bank: SlotBank) -> ModuleWeights:
    """The host weights (float32) as the device holds them: factors rounded through `slot_dtype`, a bat
    block through the model's dtype, when narrower, so the reference checks the served math and not the
    rounding."""
    held = bank.slot_dtype if weights.batched else bank.dtype
    if held == torch.float32:
        return weights
    rnd = lambda t: t.to(held).to(t.dtype)  # noqa: E731
    if isinstance(weights, LoraWeights):
        return dataclasses.replace(weights, a=rnd(weights.a), bt=rnd(weights.bt))
    return dataclasses.replace(weights, block=rnd(weights.block))
