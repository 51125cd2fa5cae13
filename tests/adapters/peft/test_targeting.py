"""Module targeting against PEFT's own functions, and client regexes in linear time.

Every config regex runs on RE2 here and on Python's `re` in PEFT: for each
pattern the parser accepts, the modules selected and the rank/alpha keys found
must be exactly PEFT's, on hand-picked and on generated patterns.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_config import AdapterSpec, parse_config
from server.errors import AdapterError
from server.settings import Settings

SETTINGS = Settings(store=Path("unused-store"), max_rank=1024)
NAMES = [
    "model.embed_tokens", "lm_head", "model.norm",
    *(f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1, 12) for p in "qkvo"),
    *(f"model.layers.{i}.mlp.{p}_proj" for i in (0, 3) for p in ("gate", "up", "down")),
    "model.layers.1.mlp.experts.0.up_proj", "model.layers.10.mlp.experts.3.down_proj",
    "model.decoder.layers.2.fc1", "transformer.h.3.attn.c_attn", "transformer.h.11.mlp.c_proj",
    "q_proj", "layers.0.q_proj", "model.layers.0.Q_PROJ",
]


def parse(**cfg) -> AdapterSpec:
    return parse_config(json.dumps({"peft_type": "LORA", **cfg}).encode(), AdapterLimits.from_settings(SETTINGS))


def peft_selects(cfg: dict, name: str) -> bool:
    config = SimpleNamespace(target_modules=cfg.get("target_modules"), exclude_modules=cfg.get("exclude_modules"),
                             layers_to_transform=cfg.get("layers_to_transform"),
                             layers_pattern=cfg.get("layers_pattern"), target_parameters=None, modules_to_save=None)
    return bool(check_target_module_exists(config, name))  # PEFT's _ExcludedModule is falsy


def peft_rank(rank_pattern: dict, name: str, r: int = 8) -> int:
    return rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), r)


def assert_like_peft(cfg: dict) -> None:
    """Either refused, or selecting (and ranking) every name exactly as PEFT does."""
    try:
        spec = parse(r=8, **cfg)
    except AdapterError:
        return
    for name in NAMES:
        assert spec.targets(name, set()) == peft_selects(cfg, name), (cfg, name)
        if "rank_pattern" in cfg:
            assert spec.module_rank(name) == peft_rank(cfg["rank_pattern"], name), (cfg, name)


FIXED = [
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": r"(?i).*q_proj"},
    {"target_modules": r"model\.layers\.\d+\.mlp\..*"},
    {"target_modules": r".*layers\.1\..*"},
    {"target_modules": "q_proj"},  # a regex string: fullmatch, so only the bare name
    {"target_modules": r".*(\.experts\.\d+)*\.up_proj"},
    {"target_modules": ["q_proj", "mlp.up_proj", "c_attn"], "exclude_modules": r".*layers\.0\..*"},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "up_proj", "fc1"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1, "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q_proj", "up_proj", "c_proj"], "layers_to_transform": [3, 11], "layers_pattern": "h"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": r"lay\w+"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": ""},
    {"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4, r"layers\.1\..*": 16}},
    {"target_modules": ["q_proj"], "rank_pattern": {r"layers.1.self_attn.q_proj": 4, "self_attn.q_proj": 2}},
    {"target_modules": ["q_proj"], "rank_pattern": {"q_proj)|(.*mlp.*": 4}},  # breaks out of PEFT's group
    {"target_modules": ["q_proj"], "rank_pattern": {"^model": 4, "proj$": 6, "(?i:Q_PROJ)": 3}},
]


@pytest.mark.parametrize("cfg", FIXED, ids=[json.dumps(c)[:60] for c in FIXED])
def test_fixed_configs_select_like_peft(cfg):
    parse(**cfg)  # accepted: these are ordinary PEFT configs
    assert_like_peft(cfg)


ATOMS = ["q", "proj", "_", "layers", "self_attn", "mlp", "up", "0", "1", "12", r"\.", ".", r"\d", r"\w", "[a-z]",
         "[^.]", "(q|v)", "(?:k|o)_proj", r"(\.\d+)", "^", "$", "|", r"\b", "[.]", "(", ")", "{", "(?i)", "(?=q)",
         r"\1", "{,2}", "[[:digit:]]", "(?P<idx>1)", "[", "]", "\\", "{"]
QUANTS = ["", "", "", "*", "+", "?", "*?", "{1,2}", "{2}"]
PATTERN = st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(QUANTS)), max_size=5).map(
    lambda parts: "".join(a + q for a, q in parts))
CONFIGS = st.one_of(
    PATTERN.map(lambda p: {"target_modules": p}),
    PATTERN.map(lambda p: {"target_modules": ["q_proj", "up_proj"], "exclude_modules": p}),
    PATTERN.map(lambda p: {"target_modules": ["q_proj", "up_proj", "c_proj"], "layers_to_transform": [0, 1, 3],
                           "layers_pattern": p}),
    st.lists(PATTERN, min_size=1, max_size=3).map(
        lambda ps: {"target_modules": ["q_proj"], "rank_pattern": {p: 2 + i for i, p in enumerate(ps)}}),
)


@hsettings(max_examples=300, derandomize=True, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
def test_generated_patterns_select_like_peft(cfg):
    assert_like_peft(cfg)


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@hsettings(max_examples=200, derandomize=True, deadline=2000)
@given(PATTERN)
def test_patterns_python_cannot_compile_are_refused(pattern):
    """What PEFT would crash on (re.error) is refused, never served with RE2's reading."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        with pytest.raises(AdapterError, match="target_modules: pattern"):
            parse(target_modules=pattern)


# On `re` each of these takes exponential time in the name's length (minutes to hours here).
HOSTILE = [
    {"target_modules": r"(.|\w)*z"},
    {"target_modules": r"(a|aa)*$"},
    {"target_modules": ["q_proj"], "exclude_modules": r"(\w|_)*z"},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": r"(.*)*x"},
    {"target_modules": ["q_proj"], "rank_pattern": {r"(\w+)+z": 4}},
    {"target_modules": ["q_proj"], "alpha_pattern": {r"(.|\w)*z": 4}},
]


@pytest.mark.parametrize("cfg", HOSTILE, ids=[json.dumps(c)[:50] for c in HOSTILE])
def test_backtracking_shapes_match_in_linear_time(cfg):
    spec = parse(**cfg)
    name = "model.layers.0." + "a" * 26 + ".q_proj"  # ~2**26 paths for a backtracking engine
    start = time.monotonic()
    spec.targets(name, set())
    spec.module_rank(name)
    spec.module_alpha(name)
    assert time.monotonic() - start < 0.5


def test_pattern_keys_are_bounded_and_compiled_once():
    keys = {rf"layers\.{i}\.self_attn\.x": 4 for i in range(1024)}
    spec = parse(target_modules=["q_proj"], rank_pattern=keys)
    start = time.monotonic()
    for name in NAMES * 20:  # repeated names: the key lookup is remembered per name
        spec.module_rank(name)
    assert time.monotonic() - start < 1.0
    with pytest.raises(AdapterError, match=r"1025 patterns .* limit is 1024 \(max_pattern_keys\)"):
        parse(target_modules=["q_proj"], rank_pattern=keys, alpha_pattern={"x": 1})
    with pytest.raises(AdapterError, match=r"1025 patterns"):
        parse(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["layers"] * 1025)


def test_list_fields_are_bounded():
    many = [f"m{i}" for i in range(4097)]
    for key in ("target_modules", "exclude_modules"):
        with pytest.raises(AdapterError, match=rf"{key} has 4097 entries; the limit is 4096"):
            parse(**{"target_modules": ["q_proj"], key: many})
    with pytest.raises(AdapterError, match="layers_to_transform has 4097 entries"):
        parse(target_modules=["q_proj"], layers_to_transform=list(range(4097)))
