"""The model families loraplex serves exactly, and the start-up check that refuses the rest.

Why a list and not "anything transformers loads": the engine replaces the
model's attention and cache, so a family is served right only if every
attention feature its modeling code uses is implemented by the engine
(server/engine/attention.py). Each family below is tested against
transformers' generate and PEFT (tests/model/test_families.py). A config field
that looks like an attention feature and is not known here is refused too: a
new flag in a known family may change the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnsupportedModel(RuntimeError):
    """The model asks for something the engine does not implement (start-up, or a call the check missed)."""


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    attention: str  # the attention features the engine honours for it (README's matrix)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("Llama", "llama", "causal, GQA, RoPE (incl. llama3 / linear / yarn scaling)"),
    Family("Mistral", "mistral", "causal, GQA, sliding window on every layer (when set)"),
    Family("Qwen2", "qwen2", "q/k/v bias, sliding window on layers past max_window_layers (when enabled)"),
    Family("Qwen3", "qwen3", "q/k RMSNorm, sliding window per layer_types (when enabled)"),
    Family("Gemma 2", "gemma2", "logit soft-capping (attention and final), query_pre_attn_scalar, "
                                "alternating local (sliding) / global layers"),
    Family("Gemma 3 (text)", "gemma3_text", "local/global layer pattern with per-type RoPE, q/k norm, "
                                            "query_pre_attn_scalar"),
    Family("Phi-3", "phi3", "fused qkv_proj / gate_up_proj, sliding window (when set), partial RoPE"),
    Family("OLMo 2", "olmo2", "q/k RMSNorm over all heads, post-norm blocks"),
)}

# Attention-shaped config fields the engine honours (through the modeling code's attention call or the runner).
HONOURED = frozenset({
    "attention_bias", "attention_dropout", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "_sliding_window_pattern",
    "sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
    "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "partial_rotary_factor",
    "output_attentions", "chunk_size_feed_forward",
})
ATTENTION_WORDS = ("attn", "attention", "window", "softcap", "sink", "chunk", "bidirectional", "alibi", "rope",
                   "causal")
LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# RoPE variants whose frequencies depend on the longest position in the forward's batch: in a batch of
# several sequences one sequence's length would change another's output.
BATCH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def supported_list() -> str:
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())


def check_model(config: Any, max_context: int) -> Family:
    """The model's family, or UnsupportedModel naming the model and what the engine cannot honour."""
    model_type = config.model_type
    name = f"{config.name_or_path or model_type} ({model_type})"
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModel(f"model {name}: architecture {model_type!r} is not supported; "
                               f"supported families: {supported_list()}")
    fields = config.to_dict()
    for key, value in fields.items():
        if key in HONOURED or value in (None, False, 0) or not any(w in key.lower() for w in ATTENTION_WORDS):
            continue
        raise UnsupportedModel(f"model {name}: config field {key}={value!r} is an attention feature "
                               "loraplex's engine does not implement")
    unknown = set(fields.get("layer_types") or ()) - LAYER_TYPES
    if unknown:
        raise UnsupportedModel(f"model {name}: layer_types {sorted(unknown)} are not implemented "
                               f"(the engine implements {sorted(LAYER_TYPES)})")
    _check_rope(name, fields.get("rope_parameters"), max_context)
    return family


def _check_rope(name: str, params: Any, max_context: int) -> None:
    if not isinstance(params, dict):
        return
    per_type = params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    for p in per_type:
        rope_type = p.get("rope_type", "default")
        original = p.get("original_max_position_embeddings")
        if rope_type in BATCH_DEPENDENT_ROPE and (original is None or max_context > original):
            raise UnsupportedModel(
                f"model {name}: rope_type {rope_type!r} changes with the longest sequence in a batch, so one "
                f"request would change another's output past {original} tokens; serve it with "
                f"LORAPLEX_MAX_SEQ_LEN <= {original} (the model's original context)")
