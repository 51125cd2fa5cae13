"""Builders for adapter tests: the tiny random Llama and PEFT adapters of every kind.

PEFT itself writes every adapter file (`save_pretrained`), with its adapter
weights overwritten by non-zero random values (PEFT's own init makes most of
them zero, which would hide bugs). Legacy Bone is gone from PEFT 0.21, so a Bone
file is a PEFT MiSS file with `miss_block` keys renamed to `bone_block` and
`peft_type` BONE — the layout old PEFT's `save_pretrained` wrote.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from server.model.load import BaseModel
from server.settings import Settings
from tests.conftest import tiny_llama_config

# A smaller vocabulary than SmolLM2's keeps the lm_head matmul (most of a tiny forward) cheap.
VOCAB = 4096
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "miss_block")
ALL_KINDS = ["lora_qv", "lora_all", "lora_embed", "miss_balance", "miss_mini", "miss_bat", "bone", "bone_bat"]
DORA_KINDS = ["dora_qv", "dora_all"]
# modules_to_save: a fine-tuned head, a fine-tuned input embedding, both (one shared copy on a tied base).
SAVED_KINDS = ["mts_head", "mts_embed", "mts_both_tied"]
EOS = 2


def adapter_settings(tmp_path: Path, **overrides) -> Settings:
    kw = dict(store=tmp_path / "store", device="cpu", dtype="float32", max_adapters_resident=6, max_rank=32)
    kw.update(overrides)
    return Settings(**kw)


def tiny_base(seed: int = 0, **config) -> BaseModel:
    """`config`: LlamaConfig overrides (`attention_bias=True` gives the projections a bias)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, **config))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
        for module in model.modules():  # HF zeroes biases at init: a zero bias would hide its handling
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    model.eval().requires_grad_(False)
    return BaseModel(model=model, tokenizer=None, model_id="tiny", device=torch.device("cpu"),
                     dtype=torch.float32, max_context=512)


def peft_config(kind: str):
    from peft import LoraConfig, MissConfig

    configs = {
        "lora_qv": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "lora_all": lambda: LoraConfig(
            r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
            rank_pattern={"o_proj": 4, "layers.1.mlp.down_proj": 12}, alpha_pattern={"gate_proj": 32}),
        "lora_embed": lambda: LoraConfig(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        "miss_balance": lambda: MissConfig(r=12, target_modules=["q_proj", "v_proj", "down_proj"]),
        "miss_mini": lambda: MissConfig(r=8, init_weights="mini", mini_r=4, target_modules=["q_proj", "gate_proj"]),
        "miss_bat": lambda: MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "o_proj", "up_proj"]),
        "bone": lambda: MissConfig(r=8, target_modules=["k_proj", "v_proj", "up_proj"]),
        "bone_bat": lambda: MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]),
        "dora_qv": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]),
        "dora_all": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, use_rslora=True, target_modules="all-linear",
                                       rank_pattern={"o_proj": 4}),
        "mts_head": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["lm_head"]),
        "mts_embed": lambda: MissConfig(r=8, target_modules=["k_proj"], modules_to_save=["embed_tokens"]),
        "mts_both_tied": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                            modules_to_save=["lm_head", "embed_tokens"], ensure_weight_tying=True),
    }
    return configs[kind]()


def make_peft(base: BaseModel, kind: str, out_dir: Path, seed: int = 1, scale: float = 0.1):
    """A PEFT model over a copy of `base` with random adapter weights, saved to `out_dir`."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base.model), peft_config(kind))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{key}" in name for key in ADAPTER_PARAMS):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif ".lora_magnitude_vector" in name:  # PEFT inits m = ‖W‖: make it differ from any norm
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            elif ".modules_to_save." in name:  # a copy of the base module: fine-tune it (a tied copy once)
                p.add_(torch.randn(p.shape, generator=gen))
    model.eval()
    model.save_pretrained(out_dir)
    if kind.startswith("bone"):
        to_bone(out_dir)
    return model


def to_bone(path: Path) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    save_file({k.replace("miss_block", "bone_block"): v for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "BONE"
    cfg.pop("mini_r", None)
    cfg.pop("miss_dropout", None)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(fn(dict(tensors)), path / "adapter_model.safetensors")


# --- running a model under an AdapterMapping (numerics and merge tests) -----------------------

def token_ids(seed: int, rows: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits_under(model, ids: torch.Tensor, slot: int, lane: int | None = None) -> torch.Tensor:
    """Full-forward logits with every row on adapter `slot` (or on merged copy `lane`)."""
    from server.adapters.runtime.mapping import AdapterMapping
    from server.adapters.runtime.step import adapter_step

    mapping = AdapterMapping.from_row_slots([slot] * ids.shape[0], ids.shape[1], lane=lane)
    with torch.no_grad(), adapter_step(mapping):
        return model(input_ids=ids).logits


def greedy_under(model, ids: torch.Tensor, slot: int, steps: int, lane: int | None = None) -> torch.Tensor:
    """Full-forward greedy loop with HF's stopping rule (finished rows continue with pad = eos)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        nxt = logits_under(model, ids, slot, lane)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
        done |= nxt == EOS
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
    return ids


def greedy_mixed_decode(model, ids: torch.Tensor, rows: list[int], steps: int = 6) -> torch.Tensor:
    """Prefill then one-token steps of one mixed batch (row i on adapter slot rows[i]), as the engine runs
    them with a KV cache; returns the prompts with `steps` greedy tokens appended."""
    from transformers import DynamicCache

    from server.adapters.runtime.mapping import AdapterMapping
    from server.adapters.runtime.step import adapter_step

    cache, out = DynamicCache(), ids
    with torch.no_grad():
        with adapter_step(AdapterMapping.from_row_slots(rows, ids.shape[1])):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)  # [rows, 1]
            out = torch.cat([out, nxt], dim=1)
            with adapter_step(AdapterMapping.from_row_slots(rows, 1)):
                logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def peft_greedy(peft_model, ids: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """PEFT's generate on one row, `steps` tokens exactly (EOS does not stop it)."""
    return peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                               min_new_tokens=steps, do_sample=False, pad_token_id=EOS, eos_token_id=None)
