"""What the adapters package needs from the configuration, as one frozen value.

The adapters package sits below `settings`: it is handed this slice at
construction (built once by the app) instead of reading `Settings` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

MiB = 1024 * 1024


class AdapterSettings(Protocol):
    """The configuration fields `AdapterLimits.from_settings` reads (server.settings.Settings has them)."""

    max_rank: int
    max_adapter_bytes: int
    max_json_depth: int
    max_config_list_items: int
    max_pattern_keys: int
    slot_dtype: str
    max_adapters_resident: int | str  # "auto": resolved by the app (residency/sizing.py)
    max_batch: int
    max_adapters_host: int
    max_merged: int
    module_copy_budget_mb: int
    cpu_kernels: bool
    cache_dir: Path

    @property
    def slot_torch_dtype(self) -> torch.dtype: ...


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64
    max_adapter_bytes: int = 256 * MiB
    max_json_depth: int = 32  # nesting of adapter_config.json and safetensors headers
    max_config_list_items: int = 4096
    max_pattern_keys: int = 1024
    slot_dtype: torch.dtype | None = None  # adapter factors in device slots; None = the model's dtype
    max_adapters_resident: int = 8  # device slots per adapted module, resolved (never "auto")
    max_adapters_host: int = 128
    max_merged: int = 2
    module_copy_budget: int = 256 * MiB  # device bytes of whole-module copies (modules_to_save); 0 = refused
    cpu_kernels: bool = True
    kernel_cache_dir: Path | None = None  # where the C kernel is built; None = no kernel

    @classmethod
    def from_settings(cls, settings: AdapterSettings, resident: int | None = None) -> AdapterLimits:
        """`resident`: the slot count the app resolved (sizing.plan_slots); None = the setting, with
        `auto` taken as a full batch (what auto is wherever device memory does not cap it)."""
        if resident is None:
            setting = settings.max_adapters_resident
            resident = setting if isinstance(setting, int) else settings.max_batch
        return cls(
            max_rank=settings.max_rank, max_adapter_bytes=settings.max_adapter_bytes,
            max_json_depth=settings.max_json_depth, max_config_list_items=settings.max_config_list_items,
            max_pattern_keys=settings.max_pattern_keys,
            slot_dtype=None if settings.slot_dtype == "auto" else settings.slot_torch_dtype,
            max_adapters_resident=resident, max_adapters_host=settings.max_adapters_host,
            max_merged=settings.max_merged, module_copy_budget=settings.module_copy_budget_mb * MiB,
            cpu_kernels=settings.cpu_kernels, kernel_cache_dir=settings.cache_dir,
        )
