"""AdapterBackend: how the slot factors' term `y += (x·Aᵀ)·Bᵀ` is computed, chosen once at injection.

The layers (layers.py) decide *whether* a module adds adapter terms; a backend
decides *how*, from the step's AdapterBatch (plan.py) and the module's
SlotBank. `TorchBackend` is torch's GEMMs: per segment for long runs
(prefill), one batched GEMM over all short runs (decode). `CpuKernelBackend`
sends decode's short runs to the C kernel (server/kernels/lora_cpu.c) and
everything the kernel does not take to a TorchBackend.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from server.adapters.runtime.dora import rescale_dora
from server.adapters.runtime.plan import AdapterBatch, Grouped
from server.adapters.runtime.slots import SlotBank
from server.kernels.cpu import GroupedLoraKernel

# Up to this many tokens per slot, the shrink runs as A·xᵀ (A the left operand): MKL's batched
# GEMM streams A faster that way when the other side is this thin (bench/NOTES.md, "Backend thresholds").
LEFT_SHRINK_MAX_T = 4

# Up to this many decode tokens per slot, CPU float32 uses the C kernel (server/kernels/lora_cpu.c):
# it re-reads a slot's weights per 4 tokens, and up to here that still beat torch (bench/NOTES.md,
# "Backend thresholds"); beyond it, MKL's GEMM.
KERNEL_MAX_T = 128


class AdapterBackend(Protocol):
    # True: add_linear adds into a 16-bit y in float32 and rounds once itself, so the layer hands it y as is
    # (no widened copy); False: the layer widens y and x to float32 around it.
    rounds_once: bool

    def add_linear(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch,
                   bias: torch.Tensor | None = None) -> None:
        """x2 `[tokens, in]`, y2 `[tokens, out]` += each token's own slot term (in place); then DoRA
        slots' rows are rescaled (dora.py: y2 holds the base output with `bias`, which the rescale leaves out)."""

    def add_embedding(self, ids: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch) -> None:
        """ids `[tokens]`, y2 `[tokens, dim]` += each token's own slot term (in place)."""


class TorchBackend:
    """torch's GEMMs: any device and dtype, autograd-safe; the reference the kernels are tested against."""

    rounds_once = False

    def add_linear(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch,
                   bias: torch.Tensor | None = None) -> None:
        self.add_long(x2, y2, bank, batch)
        if batch.grouped is not None and bank.r_used:
            self.add_grouped(x2, y2, bank, batch.grouped)
        rescale_dora(y2, bias, bank, batch)

    def add_long(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch) -> None:
        """Each long run (prefill) on its own slice of x: no gather."""
        r = bank.r_used
        if not r:
            return
        assert bank.a is not None and bank.bt is not None
        for slot, start, n in batch.long:
            if bank.ranks[slot]:
                a, bt = _like(bank.a[slot, :r], x2), _like(bank.bt[slot, :r], x2)  # [r, in], [r, out]
                # addmm_: the rank-r product is added as MKL writes it (no [n, out] temporary)
                y2[start:start + n].addmm_(x2[start:start + n] @ a.T, bt)

    def add_grouped(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, g: Grouped) -> None:
        """The short runs through torch's batched GEMM, one bmm pair per run of consecutive slots."""
        assert bank.a is not None and bank.bt is not None
        r = bank.r_used
        a, bt = bank.a[:, :r], bank.bt[:, :r]  # [slots, r, in], [slots, r, out]
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

    def add_embedding(self, ids: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch) -> None:
        """LoRA on the input embedding: Δ = emb(ids, Aᵀ) · (B·s)ᵀ."""
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


class CpuKernelBackend:
    """Decode's short runs through the C kernel; the rest (long runs, embeddings, what it does not take)
    through `fallback`. The kernel reads every slot's first r rows in place: scattered slots cost no
    extra call and no slicing."""

    rounds_once = False  # float32 only: there is nothing to round

    def __init__(self, kernel: GroupedLoraKernel, fallback: TorchBackend | None = None) -> None:
        self.kernel = kernel
        self.fallback = fallback or TorchBackend()

    def add_linear(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch,
                   bias: torch.Tensor | None = None) -> None:
        self.fallback.add_long(x2, y2, bank, batch)
        g = batch.grouped
        if g is not None and bank.r_used:
            if self._takes(x2, y2, bank, g):
                assert bank.a is not None and bank.bt is not None and g.blocks is not None
                self.kernel.add(x2, y2, bank.a, bank.bt, g.blocks, bank.r_used, supported=True)
            else:
                self.fallback.add_grouped(x2, y2, bank, g)
        rescale_dora(y2, bias, bank, batch)  # around the kernel's LoRA term

    def add_embedding(self, ids: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch) -> None:
        self.fallback.add_embedding(ids, y2, bank, batch)

    def _takes(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, g: Grouped) -> bool:
        """The one place that decides whether the kernel runs: CPU grouping built, few tokens per slot,
        no autograd (the kernel writes in place, unseen), tensors of a layout and dtype it was built for."""
        assert bank.a is not None and bank.bt is not None
        return (g.blocks is not None and g.t_max <= KERNEL_MAX_T and not x2.requires_grad
                and not y2.requires_grad and self.kernel.supports(x2, y2, bank.a, bank.bt))


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
