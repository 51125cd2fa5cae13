"""Hypothesis strategies for hostile adapter files: config edits, JSON values, safetensors header edits.

Shared by the validator fuzz (tests/adapters) and the upload fuzz over HTTP (tests/hardening).
"""

from __future__ import annotations

import json
import struct

from hypothesis import strategies as st

CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
               "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "bias", "modules_to_save",
               "init_lora_weights", "init_weights", "mini_r", "auto_map", "trust_remote_code", "lora_bias",
               "target_parameters", "layer_replication", "task_type"]
MODULES = ["q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head",
           "self_attn", "mlp", "layers", "model.layers.0.self_attn.q_proj", "all-linear", "ALL-LINEAR", ""]
REGEXES = [r".*\.(q|v)_proj", r"(.|\w)*z", r"(a|aa)*$", r"(?=x)", r"(a)\1", "[", r"a{,2}", "[[:alpha:]]", "(?i)q",
           r".*layers\.0\..*", "q_proj)|(x", "\ud800", "a" * 5000]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(MODULES + REGEXES))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
VALUES = st.one_of(
    JSON,
    st.sampled_from(["LORA", "MISS", "BONE", "IA3", "lora"]),
    st.lists(st.sampled_from(MODULES + REGEXES), max_size=5),
    st.dictionaries(st.sampled_from(MODULES + REGEXES), st.one_of(st.integers(-2, 80), st.floats()), max_size=4),
)
EDITS = st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(st.just(None), VALUES), max_size=5)

ENTRY_EDITS = st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), st.one_of(
    JSON, st.sampled_from(["F32", "F16", "BF16", "I32", "F128", "BOOL"]),
    st.lists(st.integers(-1, 2**54), max_size=9)), max_size=2)


def mutate_header(blob: bytes, edits: list[tuple[int, dict]], extra: dict, trim: int, header_len_delta: int) -> bytes:
    """A safetensors file with some entries' fields replaced, keys added, data trimmed/padded, length skewed."""
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    for index, changes in edits:
        name = names[index % len(names)]
        header[name] = {**header[name], **changes}
    header.update(extra)
    raw = json.dumps(header).encode()
    data = data[:len(data) + trim] if trim < 0 else data + b"\0" * trim
    return struct.pack("<Q", len(raw) + header_len_delta) + raw + data


HEADER_EDITS = dict(edits=st.lists(st.tuples(st.integers(0, 7), ENTRY_EDITS), max_size=3),
                    extra=st.dictionaries(st.text(max_size=60), JSON, max_size=2),
                    trim=st.integers(-16, 16), header_len_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
