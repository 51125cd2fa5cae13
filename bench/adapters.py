"""Adapters for the benchmark, made by PEFT itself and placed in a server store.

Why PEFT writes them: the server must serve what users upload (PEFT's
`save_pretrained` output), so the bench uses exactly that format. Weights are
random and non-zero (a zero-initialised LoRA B would let a server skip the
adapter math and still look correct). Adapters are placed as "loose" files at
`<store>/<tenant>/<id>/`, which the store serves as version 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, MissConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import PreTrainedModel

TENANT = "default"  # the dev-mode tenant
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

Kind = Literal["lora", "miss"]

# Scales chosen so each adapter moves a layer's output by roughly 5-10 %:
# outputs differ visibly from the base (the math is really applied) while the
# text stays text (greedy choices stay well separated, so token-equality
# checks against PEFT are meaningful rather than tie-breaking noise).
LORA_B_STD = 0.01
MISS_BLOCK_STD = 0.003


@dataclass(frozen=True)
class AdapterSpec:
    adapter_id: str
    kind: Kind
    path: Path  # directory with adapter_config.json + adapter_model.safetensors
    tensor_bytes: int  # bytes of the adapter's tensors (what a cache must hold at least)


def store_dir(store: Path, adapter_id: str, tenant: str = TENANT) -> Path:
    return store / tenant / adapter_id


def tensor_bytes(weights: Path) -> int:
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            total += math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}.get(dtype, 4)


def _peft_config(kind: Kind, rank: int) -> LoraConfig | MissConfig:
    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                          init_lora_weights=True, task_type="CAUSAL_LM")
    # MiSS "balance" (init_weights=True): one [r, out] block per layer, shared over input groups.
    return MissConfig(r=rank, target_modules="all-linear", init_weights=True, task_type="CAUSAL_LM")


@torch.no_grad()
def _randomize(peft_model: PeftModel, kind: Kind, seed: int) -> None:
    """Fill the adapter's tensors with seeded random values (CPU generator, then copy: device-agnostic)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if kind == "lora" and "lora_A" in name:
            fan_in = p.shape[1]
            vals = torch.randn(p.shape, generator=gen) / fan_in**0.5  # [r, in]
        elif kind == "lora" and "lora_B" in name:
            vals = torch.randn(p.shape, generator=gen) * LORA_B_STD  # [out, r]
        elif kind == "miss" and "miss_block" in name:
            vals = torch.randn(p.shape, generator=gen) * MISS_BLOCK_STD  # [r, out]
        else:
            continue
        p.copy_(vals.to(device=p.device, dtype=p.dtype))


def make_adapters(model: PreTrainedModel, kind: Kind, ids: Sequence[str], dest: Path, rank: int,
                  seed: int, tenant: str = TENANT) -> list[AdapterSpec]:
    """Write one PEFT adapter per id under `dest/<tenant>/<id>/`; the base model is left as it was."""
    peft_model = get_peft_model(model, _peft_config(kind, rank))
    specs: list[AdapterSpec] = []
    try:
        for i, adapter_id in enumerate(ids):
            _randomize(peft_model, kind, seed * 100_003 + i)
            out = store_dir(dest, adapter_id, tenant)
            peft_model.save_pretrained(str(out))
            (out / "README.md").unlink(missing_ok=True)
            specs.append(AdapterSpec(adapter_id, kind, out, tensor_bytes(out / WEIGHTS_NAME)))
    finally:
        peft_model.unload()  # take the injected layers out again, weights untouched
    return specs


def link_adapters(sources: Sequence[AdapterSpec], ids: Iterable[str], dest: Path,
                  tenant: str = TENANT, copy: bool = False) -> list[AdapterSpec]:
    """Register many ids that share a few weight files (hard links keep disk use flat).

    id i gets the files of sources[i % len(sources)]; the server still loads,
    validates and caches each id as its own adapter. `copy=True` writes real
    copies (distinct inodes, so distinct page-cache pages).
    """
    specs: list[AdapterSpec] = []
    for i, adapter_id in enumerate(ids):
        src = sources[i % len(sources)]
        out = store_dir(dest, adapter_id, tenant)
        out.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            target = out / name
            if not target.exists():
                if copy:
                    shutil.copyfile(src.path / name, target)
                    continue
                try:
                    os.link(src.path / name, target)
                except OSError:  # cross-device or no hard links: fall back to a copy
                    shutil.copyfile(src.path / name, target)
        specs.append(AdapterSpec(adapter_id, src.kind, out, src.tensor_bytes))
    return specs


def adapter_kind(path: Path) -> str:
    return json.loads((path / CONFIG_NAME).read_text()).get("peft_type", "?").lower()
