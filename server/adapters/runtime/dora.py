"""DoRA's per-row column rescale, applied after a backend has added the slot terms.

PEFT's DoRA Linear output is `base(x) + (g − 1)·(x·Wᵀ) + g·lora(x)` with
`g = m / ‖W + s·BA‖_col` and the bias left out of the rescale. Once the backend has
added `lora(x)` to `y = x·Wᵀ + b`, that is `y += (g − 1)·(y − b)`: one gather of each
token's row of the bank's `g − 1` table (zero for base, trainer and non-DoRA slots,
so their rows get an exact `+ 0`) and one fused elementwise op, whatever mix of
slots the step holds. A step with no DoRA slot active does no work here.
"""

from __future__ import annotations

import torch

from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.slots import SlotBank


def dora_active(bank: SlotBank, batch: AdapterBatch) -> bool:
    """Whether any DoRA slot of this module runs in this step (one set check when none is resident)."""
    return bool(bank.dora_slots) and not bank.dora_slots.isdisjoint(batch.active)


def rescale_dora(y2: torch.Tensor, bias: torch.Tensor | None, bank: SlotBank, batch: AdapterBatch) -> None:
    """y2 `[tokens, out]` (base output + bias + slot terms) → DoRA's output on DoRA rows, in place."""
    if not dora_active(bank, batch):
        return
    assert bank.dora is not None
    excess = bank.dora[batch.mapping.token_slots]  # [tokens, out] float32: g − 1 per row
    acc = y2 if y2.dtype == torch.float32 else y2.float()  # a 16-bit y (Triton) is rescaled in float32
    if bias is None:
        acc.mul_(excess.add_(1))  # rows of other slots: × 1.0, exact
    else:
        acc.addcmul_(excess, acc - bias)  # rows of other slots: + 0·…, exact
    if acc is not y2:
        y2.copy_(acc)
