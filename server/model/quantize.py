"""Weight-only quantization of the base model's Linear layers (torchao), and what the rest needs to see of it.

Why here: the base is quantized once, after loading and before the adapter layers wrap its Linears, so
every wrapper calls the quantized layer as it is and adds the adapter terms in the compute dtype on top
(PEFT's TorchaoLoraLinear does the same). Code that needs the base *values* (DoRA's column norm, MiSS
bat's ΔW, the trainer's DoRA) reads them through `dense_weight`, the library's own dequantization.

Modes (torchao 0.18, per output row or group of the weight `[out, in]`):
  int8  Int8WeightOnlyConfig, one scale per output row; runs on CPU and CUDA, any float dtype.
  int4  Int4WeightOnlyConfig, tinygemm's packed layout: CUDA (compute capability ≥ 8.0) and bfloat16
        only. On CPU torchao 0.18 has no int4 weight-only path with this torch: its plain layout needs the
        CUDA-only `mslk` package, the tinygemm layout needs CUDA, and IntxWeightOnlyConfig(int4) stores one
        int4 value per int8 byte (no saving over int8), so start-up refuses it there.
The output embedding (lm_head) stays in the compute dtype: it is usually tied to the input embedding,
which an adapter row gathers from, and PEFT's modules_to_save copies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from server.model.torchao_noise import silence_torchao_noise

MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)  # tinygemm's; the largest that divides every in_features is used


class QuantizeError(RuntimeError):
    """The requested quantization cannot run here: a start-up error naming why and what would."""


@dataclass(frozen=True)
class Quantized:
    mode: str  # none | int8 | int4
    modules: int  # Linear layers whose weight is quantized
    group_size: int | None  # int4: the weight's group size along in_features


def import_torchao() -> ModuleType:
    """torchao (its known import noise filtered: torchao_noise.py), or a clear error if it is absent."""
    silence_torchao_noise()
    try:
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise QuantizeError(f"--quantize needs torchao (pip install 'loraplex[quant]'): {e}") from None
    return torchao


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao weight tensor (checked by its class's module, as PEFT does: no torchao import needed)."""
    return type(weight).__module__.startswith("torchao.")


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values as a plain tensor of its dtype: dequantized when quantized, else itself."""
    return weight.dequantize() if is_quantized(weight) else weight


def quantized_mode(model: nn.Module) -> str:
    """The mode a model's Linear weights are in (a pre-quantized checkpoint's, say): none, int8 or int4."""
    names = {type(m.weight).__name__ for m in model.modules() if isinstance(m, nn.Linear)
             and is_quantized(m.weight)}
    if not names:
        return "none"
    if names == {"Int8Tensor"}:
        return "int8"
    if all(n.startswith("Int4") for n in names):
        return "int4"
    raise QuantizeError(f"the checkpoint's weights are quantized as {sorted(names)}, which this server does "
                        "not serve (int8 or int4 weight-only torchao tensors only)")


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers to quantize: all but the output embedding and any Linear sharing an embedding's weight."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out and id(m.weight) not in embedding_weights}


def check_mode(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse what cannot run on this device and dtype, before any weight is read."""
    if mode not in MODES:
        raise QuantizeError(f"unknown quantize mode {mode!r}; one of {list(MODES)}")
    if mode != "int4":
        return
    if device.type != "cuda":
        raise QuantizeError("--quantize int4 runs on CUDA only: torchao 0.18's int4 weight-only layouts need a "
                            "CUDA device (tinygemm) or the CUDA-only mslk package; on this CPU use --quantize int8")
    if dtype != torch.bfloat16:
        raise QuantizeError(f"--quantize int4 needs --dtype bfloat16 (torchao's tinygemm int4 kernel), not "
                            f"{str(dtype).removeprefix('torch.')}")


def int4_group_size(layers: dict[str, nn.Linear]) -> int:
    """The largest tinygemm group size dividing every layer's in_features (torchao would skip the others)."""
    for size in INT4_GROUP_SIZES:
        if all(m.in_features % size == 0 for m in layers.values()):
            return size
    odd = sorted(n for n, m in layers.items() if m.in_features % INT4_GROUP_SIZES[-1])
    raise QuantizeError(f"--quantize int4: in_features of {odd[:3]} is not a multiple of "
                        f"{INT4_GROUP_SIZES[-1]} (the smallest int4 group size)")


def quantize_base(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> Quantized:
    """Quantize the model's Linear weights in place (after loading, before adapter layers are injected)."""
    check_mode(mode, device, dtype)
    if mode == "none":
        return Quantized("none", 0, None)
    torchao = import_torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    layers = targets(model)
    group_size = int4_group_size(layers) if mode == "int4" else None
    config = (Int8WeightOnlyConfig(set_inductor_config=False) if mode == "int8" else
              Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                   set_inductor_config=False))
    chosen = set(layers.values())
    torchao.quantize_(model, config, filter_fn=lambda m, _name: m in chosen)
    missed = sorted(n for n, m in layers.items() if not is_quantized(m.weight))
    if missed:
        raise QuantizeError(f"torchao left {len(missed)} Linear layers unquantized ({missed[:3]})")
    return Quantized(mode, len(layers), group_size)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor's inner tensors (codes, scales, zero points) summed."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each shared tensor counted once (tied embeddings)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
