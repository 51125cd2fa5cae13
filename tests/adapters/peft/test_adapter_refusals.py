"""Every refusal of the validator, each asserting the message names the reason."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.errors import AdapterError

PREFIX = "base_model.model.model.layers.0.self_attn."


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("valid")
    base = af.tiny_base(seed=0)
    for kind in ("lora_qv", "lora_embed", "miss_balance", "miss_mini", "miss_bat"):
        af.make_peft(base, kind, tmp / kind)
    return base, tmp


@pytest.fixture
def fresh(originals, tmp_path):
    base, src = originals
    settings = af.adapter_settings(tmp_path)

    def copy(kind: str = "lora_qv") -> Path:
        dst = tmp_path / kind
        shutil.copytree(src / kind, dst)
        return dst

    return base, settings, copy


def refused(path: Path, base, settings, match: str) -> None:
    with pytest.raises(AdapterError, match=match) as err:
        read_adapter(path, base, AdapterLimits.from_settings(settings))
    assert err.value.status == 422


def test_valid_files_are_accepted(fresh):
    base, settings, copy = fresh
    for kind in ("lora_qv", "lora_embed", "miss_balance", "miss_mini", "miss_bat"):
        assert read_adapter(copy(kind), base, AdapterLimits.from_settings(settings)).modules


CONFIG_CASES = [
    ({"use_dora": True}, r"use_dora is set but its DoRA magnitude tensor \(lora_magnitude_vector\) is missing"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save: module .lm_head. has no weight"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
    ({"lora_bias": True}, "lora_bias is not supported"),
    ({"peft_type": "IA3"}, "unsupported peft_type 'IA3'"),
    ({"peft_type": None}, "unsupported peft_type None"),
    ({"target_modules": ["nonexistent_proj"]}, r"match no module of the base model"),
    ({"target_modules": None}, "target_modules is missing"),
    ({"target_modules": ["q_proj"]}, r"v_proj'?, which target_modules does not select"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, r"k_proj' has no weights"),
    ({"target_modules": ["q_proj", "v_proj", "self_attn"]}, "neither a Linear nor an Embedding"),
    ({"layers_to_transform": [1]}, "which target_modules does not select"),
    ({"r": 4}, r"has shape \[8, 64\] but module .* needs \[4, 64\]"),
    ({"r": 0}, r"r=0 is invalid: must be >= 1"),
    ({"r": 64}, "over the configured maximum rank 32"),
    ({"rank_pattern": {"q_proj": 40}}, r"rank_pattern\['q_proj'\]=40 is over the configured maximum rank"),
    ({"lora_alpha": -4}, "lora_alpha=-4.0 is negative"),
    ({"alpha_pattern": {"v_proj": -1}}, r"alpha_pattern\['v_proj'\]=-1.0 is negative"),
    ({"auto_map": {"AutoModel": "evil.Model"}}, r"remote code \('auto_map'\)"),
    ({"extra": {"nested": [{"trust_remote_code": True}]}}, r"remote code \('trust_remote_code'\)"),
    ({"target_modules": "(a+)+q_proj"}, "match no module"),  # backtracking shapes run in linear time on RE2
    ({"target_modules": "(?=q)q_proj"}, r"target_modules: pattern '\(\?=q\)q_proj' is not supported .*RE2"),
    ({"exclude_modules": "(?<!k)v_proj"}, r"exclude_modules: pattern .* is not supported"),
    ({"layers_pattern": r"(l)\1ayers", "layers_to_transform": [0]}, r"layers_pattern: pattern .* not supported"),
    ({"rank_pattern": {"q_pr(?#x)oj": 4}}, r"rank_pattern\['q_pr\(\?#x\)oj'\]: pattern .* not supported"),
    ({"alpha_pattern": {"q_proj{,2}": 4}}, r"alpha_pattern\[.*'\{,n\}' repeats mean different things"),
    ({"layers_pattern": "[[:alpha:]]+", "layers_to_transform": [0]}, "POSIX classes"),
    ({"target_modules": "[unclosed"}, "target_modules: pattern '\\[unclosed' is not a valid regex"),
    ({"rank_pattern": {"q_proj(": 4}}, r"rank_pattern\['q_proj\('\]: pattern 'q_proj\(' is not a valid regex"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"use_qalora": True}, "use_qalora is not supported"),
    ({"target_parameters": ["x"]}, "target_parameters is not supported"),
]


@pytest.mark.parametrize("changes,message", CONFIG_CASES, ids=[m[:30] for _, m in CONFIG_CASES])
def test_config_refusals(fresh, changes, message):
    base, settings, copy = fresh
    path = copy()
    af.edit_config(path, **changes)
    refused(path, base, settings, message)


def test_regex_and_all_linear_targets_are_matched_like_peft(fresh):
    base, settings, copy = fresh
    path = copy()
    af.edit_config(path, target_modules=r".*\.(q|v)_proj")
    assert len(read_adapter(path, base, AdapterLimits.from_settings(settings)).modules) == 4
    af.edit_config(path, target_modules="all-linear")
    refused(path, base, settings, "mlp.down_proj' has no weights")  # all-linear selects every projection


def test_config_not_json(fresh):
    base, settings, copy = fresh
    path = copy()
    (path / "adapter_config.json").write_text("{not json")
    refused(path, base, settings, "adapter_config.json is not valid JSON")


def test_pickled_weights_are_refused(fresh):
    base, settings, copy = fresh
    path = copy()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    refused(path, base, settings, r"pickled weights \(adapter_model.bin\) are refused")
    (path / "adapter_model.safetensors").unlink()
    refused(path, base, settings, "pickled weights")
    (path / "adapter_model.bin").unlink()
    refused(path, base, settings, "adapter_model.safetensors is missing")


def _edit(path: Path, fn) -> None:
    af.edit_tensors(path, fn)


def _one_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("-inf")
    return t


TENSOR_CASES = {
    "nan": (lambda t: {**t, PREFIX + "q_proj.lora_A.weight": t[PREFIX + "q_proj.lora_A.weight"] * float("nan")},
            r"q_proj.lora_A.weight' contains NaN or Inf"),
    "inf": (lambda t: {**t, PREFIX + "v_proj.lora_B.weight": t[PREFIX + "v_proj.lora_B.weight"] / 0.0},
            r"v_proj.lora_B.weight' contains NaN or Inf"),
    "inf in one float16 tensor": (  # dtypes mixed in one file: the fused check still sees it
        lambda t: {**t, PREFIX + "v_proj.lora_A.weight": _one_inf(t[PREFIX + "v_proj.lora_A.weight"].half())},
        r"v_proj.lora_A.weight' contains NaN or Inf"),
    "shape": (lambda t: {**t, PREFIX + "v_proj.lora_B.weight": torch.zeros(64, 8)},
              r"v_proj.lora_B.weight' has shape \[64, 8\] but module .* needs \[32, 8\]"),
    "unknown module": (lambda t: {**{k.replace("layers.1.", "layers.7."): v for k, v in t.items()}},
                       r"unknown target module 'model.layers.7.self_attn.q_proj'"),
    "unexpected key": (lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)},
                       "unexpected tensor 'base_model.model.lm_head.weight'"),
    "no prefix": (lambda t: {**t, "q_proj.lora_A.weight": torch.zeros(2, 2)}, "PEFT keys start with"),
    "dora tensor": (lambda t: {**t, PREFIX + "q_proj.lora_magnitude_vector": torch.ones(64)},
                    r"DoRA magnitude tensors \(lora_magnitude_vector\) in an adapter whose config does not set use_dora"),
    "lora bias tensor": (lambda t: {**t, PREFIX + "q_proj.lora_B.bias": torch.ones(64)}, "lora_bias is not supported"),
    "int dtype": (lambda t: {**t, PREFIX + "q_proj.lora_A.weight": torch.zeros(8, 64, dtype=torch.int32)},
                  "adapters must be floating point"),
    "missing B": (lambda t: {k: v for k, v in t.items() if k != PREFIX + "q_proj.lora_B.weight"},
                  r"expected tensors \['A', 'B'\]"),
    "empty": (lambda t: {}, "holds no adapter tensors"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensor_refusals(fresh, case):
    base, settings, copy = fresh
    fn, message = TENSOR_CASES[case]
    path = copy()
    _edit(path, fn)
    refused(path, base, settings, message)


def test_file_over_size_limit(fresh):
    base, settings, copy = fresh
    path = copy()
    small = settings.model_copy(update={"max_adapter_bytes": 1000})
    refused(path, base, small, r"over the limit of 1000 bytes")


def test_embedding_base_copy_must_equal_base_weight(fresh):
    base, settings, copy = fresh
    path = copy("lora_embed")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert read_adapter(path, base, AdapterLimits.from_settings(settings)).modules  # PEFT's identical copy is accepted
    _edit(path, lambda t: {**t, key: t[key] + 1.0})
    refused(path, base, settings, "embed_tokens.base_layer.weight differs from the base model's weight")


def test_miss_refusals(fresh):
    base, settings, copy = fresh
    path = copy("miss_balance")
    af.edit_config(path, init_weights="foo")
    refused(path, base, settings, r"MISS init_weights='foo' is not supported")
    af.edit_config(path, init_weights=True, target_modules=["embed_tokens"])
    refused(path, base, settings, "is an Embedding module, which MISS cannot adapt")
    bat = copy("miss_bat")
    af.edit_config(bat, r=12)  # 64 % 12 != 0
    refused(bat, base, settings, r"bat needs in/out features \(64, 128\) divisible by r=12")
    mini = copy("miss_mini")
    af.edit_config(mini, mini_r=5)
    refused(mini, base, settings, "is not divisible by mini_r=5")
    af.edit_config(mini, mini_r=4, bias="MiSS_only")
    refused(mini, base, settings, "bias='MiSS_only' is not supported")


# --- hostile safetensors layouts ------------------------------------------------

def _raw(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", n) + blob + data)


K = PREFIX + "q_proj.lora_A.weight"
RAW_CASES = {
    "huge header length": (dict(header={}, header_len=2**62), "invalid header length"),
    "not json": (None, "corrupt header"),
    "header not object": (dict(header=[1, 2]), "header is not a JSON object"),
    "unknown dtype": (dict(header={K: {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, data=b"\0" * 16),
                      "unknown dtype 'F128'"),
    "bad shape": (dict(header={K: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, data=b"\0" * 4),
                  "invalid shape"),
    "offsets vs shape": (dict(header={K: {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 8]}},
                              data=b"\0" * 8), "do not match F32 shape"),
    "out of range": (dict(header={K: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, data=b"\0" * 8),
                     "size is inconsistent"),
    "overlap": (dict(header={K: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             K + "2": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data=b"\0" * 12),
                "overlaps another tensor"),
    "gap": (dict(header={K: {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data=b"\0" * 8),
            "leaves a gap"),
    "trailing bytes": (dict(header={K: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, data=b"\0" * 9),
                       "size is inconsistent"),
    "bad metadata": (dict(header={"__metadata__": {"a": 1}}), "__metadata__ must map strings"),
    "deep nesting": (dict(header={K: {"dtype": "F32", "shape": [[[1]]], "data_offsets": [0, 4]}}, data=b"\0" * 4),
                     "corrupt header: nested deeper than 3 levels"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_hostile_safetensors_layouts(fresh, case):
    base, settings, copy = fresh
    spec, message = RAW_CASES[case]
    path = copy()
    if spec is None:
        (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    else:
        _raw(path, **spec)
    refused(path, base, settings, message)


def test_nesting_past_the_json_recursion_limit(fresh):
    """json raises RecursionError (not a ValueError) here: both files must still be a clean 422."""
    base, settings, copy = fresh
    path = copy()
    deep = b"[" * 100_000 + b"]" * 100_000
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    refused(path, base, settings, "corrupt header: nested deeper than 3 levels")
    (path / "adapter_config.json").write_bytes(deep)
    refused(path, base, settings, "adapter_config.json is not valid JSON: nested deeper than 32 levels")
    cfg = json.loads((copy("miss_mini") / "adapter_config.json").read_text())
    nested: list = []
    for _ in range(31):  # the config object + 32 lists: 33 levels
        nested = [nested]
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "extra": nested}))
    refused(path, base, settings, "nested deeper than 32 levels")


def test_truncated_file(fresh):
    base, settings, copy = fresh
    path = copy()
    (path / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    refused(path, base, settings, "truncated")
    data = (copy("miss_mini") / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-3])
    refused(path, base, settings, "size is inconsistent")


def test_unaligned_and_mixed_dtype_tensors_load_exactly(fresh):
    """safetensors does not promise aligned data offsets (the reader copies such tensors), and a
    file may mix dtypes: both load to the same values as the library's own reader gives."""
    from safetensors.torch import load_file

    base, settings, copy = fresh
    path = copy()
    weights = path / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}  # not backed by the file we rewrite
    tensors[PREFIX + "q_proj.lora_A.weight"] = tensors[PREFIX + "q_proj.lora_A.weight"].half()
    names = sorted(tensors)
    header, data, offset = {}, b"", 0
    for name in names:
        raw = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float16: "F16", torch.float32: "F32"}[tensors[name].dtype],
                        "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) + 1)  # one byte past alignment: every offset is odd
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data)
    assert (8 + len(text)) % 2 == 1
    loaded = read_adapter(path, base, AdapterLimits.from_settings(settings))
    for name in names:
        module = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        w = loaded.modules[module]
        got = w.a if ".lora_A." in name else w.bt.T / 2.0  # lora_qv: scale alpha 16 / r 8 = 2 folded into B
        torch.testing.assert_close(got, tensors[name].float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind, key", [("lora_qv", "lora_B"), ("miss_balance", "miss_block")])
def test_weights_beyond_float16_are_refused_only_with_float16_slots(fresh, tmp_path, kind, key):
    """slot_dtype=float16 holds at most 65504: a larger weight is a 422 at load, not an inf in a slot."""
    base, settings, copy = fresh
    path = copy(kind)

    def huge(tensors):
        name = next(n for n in tensors if key in n)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = 1e6
        return tensors

    af.edit_tensors(path, huge)
    # float32 slots (auto): the value fits
    assert read_adapter(path, base, AdapterLimits.from_settings(settings)).modules
    f16 = af.adapter_settings(tmp_path, slot_dtype="float16")
    refused(path, base, f16, r"magnitude [0-9.]+e\+0[5-7] does not fit the float16 adapter slots")
    af.make_peft(base, kind, tmp_path / "ok")
    assert read_adapter(tmp_path / "ok", base, AdapterLimits.from_settings(f16)).modules  # ordinary weights fit
