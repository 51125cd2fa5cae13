"""The base model as the bench process sees it (for PEFT baselines and adapter prep).

Why reuse the server's loader pieces: the bench must compare against *the same*
weights, dtype and tokenizer the server serves, so it resolves the model path
and dtype exactly as `server.settings.Settings` and `server.model.load` do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bench.config import BenchConfig
from server.model.load import resolve_model_path
from server.settings import Settings


@dataclass
class BenchModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str  # local dir (or hub id) the server is pointed at too
    model_id: str
    device: torch.device
    dtype: torch.dtype


def server_settings(cfg: BenchConfig) -> Settings:
    """The Settings the server subprocess will resolve (device, dtype, model path)."""
    return Settings(model=cfg.model, device=cfg.device, dtype=cfg.dtype)  # type: ignore[arg-type]


def load_bench_model(cfg: BenchConfig) -> BenchModel:
    settings = server_settings(cfg)
    path, model_id = resolve_model_path(settings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=settings.torch_dtype)
    model.to(settings.torch_device).eval().requires_grad_(False)
    return BenchModel(model, tokenizer, path, model_id, settings.torch_device, settings.torch_dtype)
