"""Quantized tiny bases for tests: ours (quantize_base) and PEFT's reference (transformers' TorchAoConfig for
int8, BitsAndBytesConfig for nf4).

PEFT serves adapters on a torchao base only when transformers quantized it (`model.hf_quantizer` carries
the config PEFT's layers need), so the reference is loaded that way from the same saved weights; the
tests check that both hold the same codes and scales before comparing outputs. The nf4 reference has
bitsandbytes' AVX512-BF16 CPU repack turned off as the server does (server/model/quantize.py): with it on,
the reference would multiply in bfloat16 and could not be trained through.
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.model.load import BaseModel
from server.model.quantize import import_torchao, quantize_base
from tests.adapters.adapter_factory import tiny_base


def save_tiny(path: Path, seed: int = 0, **config) -> Path:
    """adapter_factory's tiny Llama (VOCAB 4096, biases non-zero when asked) as a model dir."""
    tiny_base(seed, **config).model.save_pretrained(path)
    return path


def _base(model: torch.nn.Module, mode: str) -> BaseModel:
    model.eval().requires_grad_(False)
    return BaseModel(model=model, tokenizer=None, model_id="tiny", device=torch.device("cpu"),
                     dtype=torch.float32, max_context=512, quantize=mode)


def ours(path: Path, mode: str = "int8") -> BaseModel:
    """The plain checkpoint, quantized by the server's own quantize_base (as load_base does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quantize_base(model, mode, torch.device("cpu"), torch.float32)
    return _base(model, mode)


def reference(path: Path, mode: str = "int8") -> BaseModel:
    """The same checkpoint quantized by transformers (TorchAoConfig int8 weight-only, or BitsAndBytesConfig
    nf4/fp4 computing in float32): PEFT's route."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    if mode in ("nf4", "fp4"):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
        no_cpu_repack(model)
        return _base(model, mode)

    import_torchao()
    from torchao.quantization import Int8WeightOnlyConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    return _base(model, "int8")


def no_cpu_repack(model: torch.nn.Module) -> None:
    """bitsandbytes' Linear4bit layers keep transformers' layout and the float32 matmul on this CPU."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def same_quantization(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of Linear layers whose codes or scales differ between two models (none = the same): torchao's int8
    codes and scales, or bitsandbytes' packed 4-bit codes, absmax, code book and quantization settings."""
    weights_b = {n: m.weight for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    differ = []
    for name, mod in a.named_modules():
        if isinstance(mod, torch.nn.Linear) and name in weights_b:
            wa, wb = mod.weight, weights_b[name]
            if type(wa) is not type(wb) or (hasattr(wa, "qdata") and not (
                    torch.equal(wa.qdata, wb.qdata) and torch.equal(wa.scale, wb.scale))) or (
                    hasattr(wa, "quant_state") and not _same_4bit(wa, wb)):
                differ.append(name)
    return differ


def _same_4bit(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = a.quant_state, b.quant_state
    settings = ("blocksize", "quant_type", "nested", "dtype", "shape")
    return (a.dtype == b.dtype == torch.uint8 and torch.equal(a.data, b.data) and torch.equal(sa.absmax, sb.absmax)
            and torch.equal(sa.code, sb.code) and all(getattr(sa, k) == getattr(sb, k) for k in settings))
