"""Trainable modules ↔ PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

The config carries every field peft 0.21.2's `save_pretrained` writes for the
same settings (tests compare the two), so `PeftModel.from_pretrained` loads
our output unchanged. The base embedding is never saved (PEFT would, for an
embedding target): it is the frozen base, and the reader does not need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from server.adapters.peft.peft_format import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from server.training.spec import TrainingJobSpec

PEFT_VERSION = "0.21.2"  # the format we write (and test against)


def peft_key(module_path: str, suffix: str) -> str:
    return f"{PEFT_PREFIX}{module_path}.{suffix}"


def peft_state_dict(adapters: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """PEFT key → CPU tensor, for every trainable parameter."""
    return {peft_key(path, name): t.detach().to("cpu").contiguous()
            for path, module in adapters.items() for name, t in module.state_dict().items()}


def load_peft_state_dict(adapters: Mapping[str, torch.nn.Module], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore parameters saved by `peft_state_dict` (checkpoints); strict both ways."""
    expected = {peft_key(path, name) for path, m in adapters.items() for name in m.state_dict()}
    if expected != set(tensors):
        raise ValueError(f"checkpoint keys differ from the job's modules ({len(expected ^ set(tensors))} differ)")
    for path, module in adapters.items():
        prefix = peft_key(path, "")
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _short_targets(spec: TrainingJobSpec) -> list[str]:
    return sorted(spec.target_modules)


def lora_config(spec: TrainingJobSpec, base_model_id: str | None) -> dict[str, Any]:
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model_id, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": _number(spec.lora_alpha), "lora_bias": False, "lora_dropout": spec.dropout,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION,
        "qalora_group_size": 16, "r": spec.rank, "rank_pattern": {}, "revision": None,
        "target_modules": _short_targets(spec), "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": spec.method == "dora", "use_qalora": False,
        "use_rslora": spec.use_rslora, "velora_config": None,
    }


def miss_config(spec: TrainingJobSpec, base_model_id: str | None) -> dict[str, Any]:
    init: bool | str = {"balance": True, "mini": "mini", "bat": "bat"}[spec.variant]
    return {
        "auto_mapping": None, "base_model_name_or_path": base_model_id, "bias": "none",
        "exclude_modules": None, "inference_mode": True, "init_weights": init, "layers_pattern": None,
        "layers_to_transform": None, "mini_r": spec.mini_r if spec.mini_r is not None else 1,
        "miss_dropout": spec.dropout, "modules_to_save": None, "peft_type": "MISS",
        "peft_version": PEFT_VERSION, "r": spec.rank, "revision": None,
        "target_modules": _short_targets(spec), "task_type": "CAUSAL_LM",
    }


def adapter_config(spec: TrainingJobSpec, base_model_id: str | None) -> dict[str, Any]:
    return miss_config(spec, base_model_id) if spec.method == "miss" else lora_config(spec, base_model_id)


def save_peft(directory: Path, adapters: Mapping[str, torch.nn.Module], spec: TrainingJobSpec,
              base_model_id: str | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(adapters), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(adapter_config(spec, base_model_id), indent=2, sort_keys=True))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
