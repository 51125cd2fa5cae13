"""Weight-only quantization of the base model's Linear layers (torchao, bitsandbytes), and what the rest needs
to see of it.

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
  nf4   bitsandbytes' Linear4bit, QLoRA's 4-bit NormalFloat: two codes a byte, a float32 absmax per 64
        weights, no double quantization; CPU and CUDA, any float dtype. Quantized exactly as transformers'
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") does (same layers, same bytes), so
        adapters trained with QLoRA on that base serve here on the same weights. bitsandbytes 0.50.2 repacks a
        CPU layer's weight on its first no-grad forward on AVX512-BF16 CPUs (bfloat16 absmax and matmul: not
        float32 outputs, a `dequantize_4bit` that no longer reads it, no backward); that repack is turned off
        on every layer here (`support_avx512bf16_for_cpu`), so the layer dequantizes and multiplies in the
        compute dtype.
  fp4   the same with bitsandbytes' 4-bit float code book (BitsAndBytesConfig bnb_4bit_quant_type="fp4").
The output embedding (lm_head) stays in the compute dtype: it is usually tied to the input embedding,
which an adapter row gathers from, and PEFT's modules_to_save copies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from server.model.torchao_noise import silence_torchao_noise

MODES = ("none", "int8", "int4", "nf4", "fp4")
BNB_MODES = ("nf4", "fp4")  # bitsandbytes' 4-bit code books; the rest are torchao's
BNB_BLOCK_SIZE = 64  # bitsandbytes' and transformers' default for 4-bit weights
INT4_GROUP_SIZES = (128, 64, 32)  # tinygemm's; the largest that divides every in_features is used


class QuantizeError(RuntimeError):
    """The requested quantization cannot run here: a start-up error naming why and what would."""


@dataclass(frozen=True)
class Quantized:
    mode: str  # none | int8 | int4 | nf4 | fp4
    modules: int  # Linear layers whose weight is quantized
    group_size: int | None  # int4: the weight's group size along in_features; nf4/fp4: weights per absmax


def import_torchao() -> ModuleType:
    """torchao (its known import noise filtered: torchao_noise.py), or a clear error if it is absent."""
    silence_torchao_noise()
    try:
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise QuantizeError(f"--quantize needs torchao (pip install 'loraplex[quant]'): {e}") from None
    return torchao


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes (its known import noise filtered: torchao_noise.py), or a clear error if it is absent."""
    silence_torchao_noise()
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise QuantizeError(f"--quantize nf4|fp4 needs bitsandbytes (pip install 'loraplex[quant]'): {e}") from None
    return bitsandbytes


def is_bnb_4bit(weight: torch.Tensor) -> bool:
    """A bitsandbytes Params4bit (checked by class name, as transformers and PEFT do: no import needed)."""
    return type(weight).__name__ == "Params4bit" and type(weight).__module__.startswith("bitsandbytes.")


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao or bitsandbytes 4-bit weight (checked by its class's module, as PEFT does: no import needed)."""
    return type(weight).__module__.startswith("torchao.") or is_bnb_4bit(weight)


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values as a plain tensor of its dtype: dequantized when quantized, else itself."""
    if is_bnb_4bit(weight):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state)  # [out, in] in the layer's original dtype
    return weight.dequantize() if is_quantized(weight) else weight


def weight_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the weight's values: a bitsandbytes weight stores uint8 codes of its quant state's dtype."""
    return weight.quant_state.dtype if is_bnb_4bit(weight) else weight.dtype


def weight_shape(weight: torch.Tensor) -> tuple[int, int]:
    """`(out, in)` of a Linear weight: a bitsandbytes weight's own shape is its packed codes `[out·in/2, 1]`."""
    out_features, in_features = weight.quant_state.shape if is_bnb_4bit(weight) else weight.shape
    return int(out_features), int(in_features)


def quantized_mode(model: nn.Module) -> str:
    """The mode a model's Linear weights are in (a pre-quantized checkpoint's, say): none, int8, int4, nf4 or fp4."""
    names = {type(m.weight).__name__ for m in model.modules() if isinstance(m, nn.Linear)
             and is_quantized(m.weight)}
    if not names:
        return "none"
    if names == {"Params4bit"}:
        kinds = {m.weight.quant_state.quant_type for m in model.modules() if isinstance(m, nn.Linear)
                 and is_bnb_4bit(m.weight)}
        if len(kinds) == 1 and kinds <= set(BNB_MODES):
            return kinds.pop()
        raise QuantizeError(f"the checkpoint's weights are bitsandbytes 4-bit {sorted(kinds)}, which this server "
                            "does not serve (nf4 or fp4 in every layer only)")
    if names == {"Int8Tensor"}:
        return "int8"
    if all(n.startswith("Int4") for n in names):
        return "int4"
    raise QuantizeError(f"the checkpoint's weights are quantized as {sorted(names)}, which this server does "
                        "not serve (int8 or int4 weight-only torchao tensors, or bitsandbytes nf4/fp4, only)")


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
    if mode in BNB_MODES:
        import_bitsandbytes()
    if mode != "int4":
        return
    if device.type != "cuda":
        raise QuantizeError("--quantize int4 runs on CUDA only: torchao 0.18's int4 weight-only layouts need a "
                            "CUDA device (tinygemm) or the CUDA-only mslk package; on this CPU use --quantize int8 "
                            "or nf4")
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
    if mode in BNB_MODES:
        return Quantized(mode, quantize_bnb_4bit(model, targets(model), mode, device, dtype), BNB_BLOCK_SIZE)
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


def quantize_bnb_4bit(model: nn.Module, layers: dict[str, nn.Linear], quant_type: str, device: torch.device,
                      dtype: torch.dtype) -> int:
    """Swap each Linear for a bitsandbytes 4-bit Linear4bit built as transformers' replace_with_bnb_linear does
    (then Params4bit(weight, **defaults).to(device), its loader's quantization); returns how many."""
    bnb = import_bitsandbytes()
    for name, old in layers.items():
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, old.bias is not None, dtype,
                                compress_statistics=False, quant_type=quant_type, quant_storage=torch.uint8,
                                device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, **new.weight.__dict__).to(device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        model.set_submodule(name, new.train(old.training))
    keep_dense_compute(model, dtype)
    return len(layers)


def keep_dense_compute(model: nn.Module, dtype: torch.dtype) -> None:
    """Every bitsandbytes 4-bit layer computes in `dtype` without bitsandbytes' CPU repack (module docstring)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and is_bnb_4bit(m.weight):
            m.support_avx512bf16_for_cpu = False
            m.compute_dtype, m.compute_type_is_set = dtype, True


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor's inner tensors (codes, scales, zero points) summed, a bitsandbytes
    one's packed codes and its quant state's absmax and code book."""
    if is_bnb_4bit(tensor):
        state = tensor.quant_state
        return sum(t.numel() * t.element_size() for t in (tensor.data, state.absmax, state.code))
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
