"""LoRA weights of one module, held in compute form.

PEFT computes `y += (x @ Aᵀ @ Bᵀ) · s`; we fold `s` into B once at load time and
keep `Bᵀ` (`[r, out]`), which is the layout the batched path multiplies by, so a
load is a plain copy into a device slot and serving never rescales.

DoRA (PEFT's `use_dora`) on a Linear rescales each output column of the adapted
weight: `W' = g ⊙ (W + s·BA)` with `g = m / ‖W + s·BA‖_col` (norm per output row of
`[out, in]`). `g` depends only on the adapter and the base weight, so it is computed
once at load (`dora_scale`) and serving applies it as one elementwise op per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraWeights:
    """`a` is `[r, in]` (embedding: `[r, num_embeddings]`); `bt` is `(B·s)ᵀ`, `[r, out]`."""

    a: torch.Tensor  # [r, in]
    bt: torch.Tensor  # [r, out], scale folded in
    embedding: bool = False
    batched: bool = True  # served by the stacked (A, Bᵀ) slot path
    dora_scale: torch.Tensor | None = None  # [out] float32 g = m / ‖W + s·BA‖_col; None = plain LoRA

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.dora_scale is None else self.dora_scale.numel() * self.dora_scale.element_size()
        return self.a.numel() * self.a.element_size() + self.bt.numel() * self.bt.element_size() + extra

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A `[r, in]`, Bᵀ `[r, out]`) for the slot tensors."""
        return self.a, self.bt

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW in the base weight's layout: Linear `[out, in]`, Embedding `[num_embeddings, dim]`.
        DoRA: `g ⊙ (W + s·BA) − W`, so that W + ΔW is PEFT's merged weight."""
        a = self.a.to(base_weight.device, torch.float32)
        bt = self.bt.to(base_weight.device, torch.float32)
        delta = a.T @ bt if self.embedding else bt.T @ a
        if self.dora_scale is not None:
            w = base_weight.to(torch.float32)
            delta = self.dora_scale.to(base_weight.device, torch.float32)[:, None] * (w + delta) - w
        return delta.to(base_weight.dtype)


def dora_scale(magnitude: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`g = m / ‖W + s·BA‖_col` `[out]` in float32, from `a` `[r, in]`, `bt` = (B·s)ᵀ `[r, out]` and the base
    weight `[out, in]` (PEFT's `get_weight_norm`: the norm of each output row, detached)."""
    w = weight.detach().to(torch.float32)
    adapted = w + bt.to(w.device, torch.float32).T @ a.to(w.device, torch.float32)  # [out, in]
    norm = torch.linalg.norm(adapted, dim=1)  # [out]
    return (magnitude.to(w.device, torch.float32) / norm).to(magnitude.device)


def write_scaled_bt(b: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out `[..., r, out]` = (B `[..., out, r]` · scale)ᵀ from PEFT's `lora_B.weight` (or `lora_embedding_B`):
    B is scaled in float32, and only then narrowed when `out` is a 16-bit dtype (the loader, carve.py,
    writes a whole role of a file at once with it)."""
    bt = b.transpose(-1, -2)
    if out.dtype == torch.float32 and b.dtype == torch.float32:
        torch.mul(bt, scale, out=out)  # one pass: the transposing read and the scale, cheaper than two
    elif out.dtype == torch.float32:
        out.copy_(bt).mul_(scale)  # widen exactly, then scale in float32
    else:
        out.copy_(bt.to(torch.float32) * scale)
