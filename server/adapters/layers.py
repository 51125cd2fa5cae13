"""Adapter-aware Linear / Embedding wrappers, injected in place of the base modules.

The wrapper sits at the base module's path and keeps it as `.base_layer`
(PEFT's layout), so PEFT's keys map one-to-one and tied weights stay tied. Each
forward reads the step's AdapterBatch (from the StepContext, step.py):
  - no batch / no adapters       → the base module, untouched;
  - `lane` set                   → this module's merged weight for that lane, no adapter math;
  - otherwise                    → base output + every token's own adapter term
    (`plan.py` explains the batched layout), + bat's full ΔW per bat adapter present,
    + the trainer's trainable adapter on TRAIN_SLOT rows.
`reference()` is the plain per-token version of the same math, kept for tests.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from server.adapters.loaded import ModuleWeights
from server.adapters.lora import LoraWeights
from server.adapters.mapping import TRAIN_SLOT, AdapterMapping
from server.adapters.miss import bat_delta
from server.adapters.plan import AdapterBatch, Grouped
from server.adapters.slots import SlotBank
from server.adapters.step import current_step


class AdaptedModule(nn.Module):
    """What Linear and Embedding wrappers share: slots, seams, dispatch."""

    def __init__(self, base_layer: nn.Module, name: str, bank: SlotBank) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.bank = bank
        self.merged_weights: dict[int, torch.Tensor] = {}  # merge path (issue 5): merged_id -> full weight
        self.train_adapter: nn.Module | None = None  # trainer hook: called on TRAIN_SLOT rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = current_step()
        batch = None if step is None else step.adapters
        if batch is None:
            return self.base_layer(x)
        if batch.lane is not None:
            merged = self.merged_weights.get(batch.lane)
            return self.base_layer(x) if merged is None else self._with_weight(x, merged)
        if not batch.has_adapters or (self.bank.empty and not (batch.train and self.train_adapter)):
            return self.base_layer(x)
        y = self.base_layer(x)
        x2 = self._flat_input(x)
        y2 = y.view(-1, y.shape[-1])  # [tokens, out]
        if y2.shape[0] != batch.num_tokens:
            raise RuntimeError(
                f"{self.module_name}: forward has {y2.shape[0]} tokens but the AdapterMapping has {batch.num_tokens}"
            )
        if not self.bank.empty:
            self._add_adapters_once_rounded(x2, y2, batch)
        if batch.train and self.train_adapter is not None:
            y2 = self._add_trainable(x2, y2, batch)
        return y2.view(y.shape)

    def _add_adapters_once_rounded(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        """`y += Σ adapter terms`, accumulated in float32 and rounded once to a 16-bit model's dtype.

        Why: in bfloat16 the shrink `x·Aᵀ`, the expand and the add would each round (three roundings of
        a small term onto a large one); widening the step's activations costs two casts per module.
        A float32 model adds in place, as before.
        """
        if y2.dtype == torch.float32:
            self._add_adapters(x2, y2, batch)
            return
        acc = y2.float()  # [tokens, out]
        self._add_adapters(x2 if not x2.is_floating_point() else x2.float(), acc, batch)
        y2.copy_(acc)

    def _add_trainable(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """`y += train_adapter(x)` on TRAIN_SLOT rows, out of place so autograd sees it."""
        assert self.train_adapter is not None
        rows = batch.rows(TRAIN_SLOT)  # [k]
        if rows.numel() == batch.num_tokens:
            return y2 + self.train_adapter(x2)
        return y2.index_add(0, rows, self.train_adapter(x2.index_select(0, rows)))

    def reference(self, x: torch.Tensor, mapping: AdapterMapping) -> torch.Tensor:
        """Plain per-token loop: each token through `W + ΔW` of its own adapter (host weights)."""
        x2 = self._flat_input(x)
        weight = self.base_layer.weight
        rows = []
        for t, slot in enumerate(mapping.token_slots.tolist()):
            w = weight
            if mapping.merged_id is not None:
                w = self.merged_weights.get(mapping.merged_id, weight)
            elif slot >= 0 and (host := self.bank.weights[slot]) is not None:
                w = weight + _rounded_to_slots(host, self.bank).delta_weight(weight)
            rows.append(self._one_row(x2[t], w))
        out = torch.stack(rows)  # [tokens, out]
        return out.view(*x.shape[: x.dim() - self._input_feature_dims()], -1)

    # -- per-kind pieces ---------------------------------------------------
    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _input_feature_dims(self) -> int:
        raise NotImplementedError

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _one_row(self, x_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _add_adapters(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        raise NotImplementedError


class AdaptedLinear(AdaptedModule):
    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])  # [tokens, in]

    def _input_feature_dims(self) -> int:
        return 1

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _one_row(self, x_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = x_row @ weight.T
        return y if self.base_layer.bias is None else y + self.base_layer.bias

    def _add_adapters(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        bank = self.bank
        r = bank.r_used
        if r:
            assert bank.a is not None and bank.bt is not None
            for slot, start, n in batch.long:
                if bank.ranks[slot]:
                    a, bt = _like(bank.a[slot, :r], x2), _like(bank.bt[slot, :r], x2)  # [r, in], [r, out]
                    # addmm_: the rank-r product is added as MKL writes it (no [n, out] temporary)
                    y2[start:start + n].addmm_(x2[start:start + n] @ a.T, bt)
            g = batch.grouped
            if g is not None and not self._kernel_added(x2, y2, g, r):  # decode: the kernel, kept lean
                self._add_grouped(x2, y2, g, bank.a[:, :r], bank.bt[:, :r])  # [slots, r, in], [slots, r, out]
        for slot, block in bank.bat.items():
            if slot in batch.active:
                rows = batch.rows(slot)  # [k]
                delta = bat_delta(self.base_layer.weight, block, x2.dtype)  # [out, in]: the full extra matmul
                y2.index_add_(0, rows, x2.index_select(0, rows) @ delta.T)

    def _kernel_added(self, x2: torch.Tensor, y2: torch.Tensor, g: Grouped, r: int) -> bool:
        """The short runs through the CPU kernel, when it is attached and takes these tensors; False = not done.
        It reads the first r rows of each slot in place: scattered slots cost no extra call, no slicing."""
        kernel, bank = self.bank.kernel, self.bank
        if (kernel is None or g.blocks is None or g.t_max > KERNEL_MAX_T
                or x2.requires_grad or y2.requires_grad):
            return False
        return kernel.try_add(x2, y2, bank.a, bank.bt, g.blocks, r)

    def _add_grouped(self, x2: torch.Tensor, y2: torch.Tensor, g: Grouped,
                     a: torch.Tensor, bt: torch.Tensor) -> None:
        """The short runs through torch's batched GEMM (GPU, or no kernel): the reference for the kernel."""
        xs = x2 if g.identity else x2.index_select(0, g.source)  # [S*t, in]
        blocks = xs.view(g.num_slots, g.t_max, -1)  # [S, t, in]: block b = the b-th active slot
        if g.identity:  # y's rows are the layout: add each run's product in place
            y3 = y2.view(g.num_slots, g.t_max, -1)  # [S, t, out]
            for f, c, b in g.runs:
                y3[b:b + c].baddbmm_(_shrink(blocks[b:b + c], _like(a[f:f + c], x2)), _like(bt[f:f + c], x2))
            return
        outs = [torch.bmm(_shrink(blocks[b:b + c], _like(a[f:f + c], x2)), _like(bt[f:f + c], x2))
                for f, c, b in g.runs]  # [c, t, out]
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(g.num_slots * g.t_max, -1)  # [S*t, out]
        _add_rows(y2, out, g)


class AdaptedEmbedding(AdaptedModule):
    """Input embedding; LoRA only: Δ = emb(ids, Aᵀ) · (B·s)ᵀ. The trainer's module receives ids."""

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)  # [tokens] ids

    def _input_feature_dims(self) -> int:
        return 0

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, weight, self.base_layer.padding_idx)

    def _one_row(self, x_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight[x_row]

    def _add_adapters(self, ids: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        bank = self.bank
        r = bank.r_used
        if not r:
            return
        assert bank.a is not None and bank.bt is not None
        a, bt = bank.a[:, :, :r], bank.bt[:, :r]  # [slots, num_emb, r], [slots, r, dim]
        for slot, start, n in batch.long:
            if bank.ranks[slot]:
                y2[start:start + n] += _like(F.embedding(ids[start:start + n], a[slot]), y2) @ _like(bt[slot], y2)
        g = batch.grouped
        if g is None:
            return
        table = bank.a.view(-1, bank.r_cap)  # [slots * num_emb, r_cap]
        ids_g = ids if g.all_tokens else ids.index_select(0, g.tokens)  # [n]
        h = _like(table.index_select(0, g.slots * bank.in_features + ids_g)[:, :r], y2)  # [n, r]
        blocks = h.new_zeros(g.num_slots * g.t_max, r).index_copy(0, g.positions, h).view(g.num_slots, g.t_max, r)
        outs = [torch.bmm(blocks[b:b + c], _like(bt[f:f + c], y2)) for f, c, b in g.runs]  # [c, t, dim]
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(g.num_slots * g.t_max, -1)  # [S*t, dim]
        _add_rows(y2, out, g)


# Up to this many tokens per slot, the shrink runs as A·xᵀ (A the left operand): on CPU MKL's
# batched GEMM streams A ~2× faster that way when the other side is this thin
# (bench/step_overhead.py); with more tokens per slot x·Aᵀ is as fast or faster.
LEFT_SHRINK_MAX_T = 4

# Up to this many decode tokens per slot, CPU float32 uses the C kernel (server/kernels/lora_cpu.c).
# It re-reads a slot's weights per 4 tokens (from cache after the first pass); measured on the 2-core
# EPYC, adapter math of all 210 SmolLM2 modules, 1 thread: 16 slots × 2 tokens 28 vs 31 ms for
# torch on consecutive slots (vs 62 ms for scattered ones), 1 slot × 32 tokens 14 vs 21 ms,
# 1 × 128 34 vs 46 ms. Beyond that, unmeasured: MKL's GEMM.
KERNEL_MAX_T = 128


def _rounded_to_slots(weights: ModuleWeights, bank: SlotBank) -> ModuleWeights:
    """The host weights (float32) as the slots hold them: rounded through `slot_dtype` when it is narrower
    (16-bit slots), so the reference checks the served math and not the rounding."""
    if not weights.batched or bank.slot_dtype == torch.float32:
        return weights
    rnd = lambda t: t.to(bank.slot_dtype).to(t.dtype)  # noqa: E731
    if isinstance(weights, LoraWeights):
        return dataclasses.replace(weights, a=rnd(weights.a), bt=rnd(weights.bt))
    return dataclasses.replace(weights, block=rnd(weights.block))


def _like(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Slot weights in the activations' dtype: a no-op unless settings.slot_dtype differs from the
    model's (then the torch paths widen just the slots they read; the CPU kernel reads them as stored)."""
    return w if w.dtype == x.dtype else w.to(x.dtype)


def _shrink(blocks: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`blocks @ aᵀ` per slot: `[c, t, in]` × `[c, r, in]` → `[c, t, r]`."""
    if blocks.shape[1] <= LEFT_SHRINK_MAX_T:
        return torch.bmm(a, blocks.transpose(1, 2)).transpose(1, 2)  # [c, r, t] → view [c, t, r]
    return torch.bmm(blocks, a.transpose(1, 2))


def _add_rows(y2: torch.Tensor, out: torch.Tensor, g: Grouped) -> None:
    """y += each short token's own row of the grouped output `[S*t, out]`."""
    if g.identity:
        y2 += out
        return
    rows = out.index_select(0, g.positions)  # [n, out]
    if g.all_tokens:
        y2 += rows
    else:
        y2.index_add_(0, g.tokens, rows)
