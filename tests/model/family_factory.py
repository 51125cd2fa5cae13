"""Tiny random models of every supported family, and PEFT adapters for them.

Each config keeps the family's distinguishing attention features (a sliding
window of WINDOW tokens, soft-capping, q/k norms, biases, fused projections)
at a size where a generate of a few dozen tokens takes milliseconds. Weights
are random with the embedding scaled up (greedy choices well separated) and
the attention projections scaled up (attention scores large enough that the
window and the soft-cap change the output).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 4096
WINDOW = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=32,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": {},
}
# The fused projections of Phi-3 are one Linear each: PEFT targets them by those names.
MISS_TARGETS = {"phi3": ["qkv_proj", "gate_up_proj", "down_proj"]}
MISS_DEFAULT = ["q_proj", "v_proj", "up_proj", "down_proj"]


LM_HEAD_SCALE = 20.0
PROJECTION_SCALE = {"q_proj": 4.0, "k_proj": 4.0, "qkv_proj": 4.0, "v_proj": 4.0, "o_proj": 4.0}


def family_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type], **overrides})


def build_family(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
        for name, p in model.named_parameters():
            for key, factor in PROJECTION_SCALE.items():
                if key in name and name.endswith("weight"):
                    p.mul_(factor)
    return model.eval()


def save_family(model_type: str, path: Path, tokenizer_dir: Path, **overrides) -> Path:
    from transformers import AutoTokenizer

    build_family(model_type, **overrides).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def make_adapter(model: torch.nn.Module, kind: str, out_dir: Path, model_type: str, seed: int = 1,
                 scale: float = 0.1):
    """A PEFT model (over a copy of `model`) with random adapter weights, saved to `out_dir`."""
    from peft import LoraConfig, MissConfig, get_peft_model

    if kind == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    else:
        config = MissConfig(r=8, target_modules=MISS_TARGETS.get(model_type, MISS_DEFAULT))
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(f".{key}" in name for key in ("lora_A", "lora_B", "miss_block")):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
