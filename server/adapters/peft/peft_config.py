"""`adapter_config.json`: parsing, bounds, and refusals.

Targeting follows PEFT exactly (targeting.py). Everything we cannot serve
faithfully is refused with a message that names the field, rather than
silently served differently; so is a config whose size, nesting, lists or
regex count would make checking it cost more than a bounded amount of CPU.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import json_input
from server.adapters.peft.targeting import ALL_LINEAR, PatternMap, Targeting, layers_patterns, pattern_map
from server.adapters.peft.user_regex import UserRegex, user_regex
from server.errors import AdapterError
from server.adapters.limits import AdapterLimits

MAX_CONFIG_BYTES = 1024 * 1024
SUPPORTED_TYPES = ("LORA", "MISS", "BONE")
# LoRA options that change the math or need pieces we do not serve: refused when set.
LORA_UNSUPPORTED = (
    "lora_bias", "use_qalora", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "layer_replication", "use_bdlora", "arrow_config", "kasa_config",
    "velora_config", "monteclora_config", "megatron_config",
)
# init_lora_weights values that rewrite the base weights: the adapter is meaningless on ours.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
LIST_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


@dataclass(frozen=True)
class AdapterSpec:
    peft_type: str  # LORA | MISS | BONE
    r: int
    targeting: Targeting
    alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False  # Linear modules only (peft_format refuses it elsewhere)
    rank_pattern: PatternMap[int] = field(default_factory=lambda: PatternMap({}, ()))
    alpha_pattern: PatternMap[float] = field(default_factory=lambda: PatternMap({}, ()))
    init: str = "balance"  # MiSS/Bone: balance | mini | bat
    mini_r: int = 1
    modules_to_save: tuple[str, ...] = ()  # PEFT's entries, matched as PEFT does (module name ends with one)
    ensure_weight_tying: bool = False  # a tied base's saved embedding and head share one copy (PEFT's)

    @property
    def kind(self) -> str:
        return self.peft_type.lower()

    @property
    def variant(self) -> str:
        if self.peft_type == "LORA":
            return "dora" if self.use_dora else "rslora" if self.use_rslora else "default"
        return self.init

    def module_rank(self, name: str) -> int:
        return self.rank_pattern.get(name, self.r)

    def module_alpha(self, name: str) -> float:
        return self.alpha_pattern.get(name, self.alpha)

    def targets(self, name: str, all_linear: Set[str]) -> bool:
        return self.targeting.selects(name, all_linear)


def parse_config(raw: bytes, limits: AdapterLimits) -> AdapterSpec:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter_config.json is over {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json_input.loads(raw.decode("utf-8"), limits.max_json_depth)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError("adapter_config.json must be a JSON object")
    _refuse_remote_code(cfg)
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterError(f"unsupported peft_type {peft_type!r}: supported are {', '.join(SUPPORTED_TYPES)}")
    _refuse_common(cfg)
    _check_bounds(cfg, limits)
    spec = _lora_spec(cfg) if peft_type == "LORA" else _miss_spec(cfg, peft_type)
    _check_ranks(spec, limits)
    return dataclasses.replace(spec, modules_to_save=_modules_to_save(cfg),
                               ensure_weight_tying=_bool(cfg.get("ensure_weight_tying", False), "ensure_weight_tying"))


def _refuse_remote_code(obj: Any) -> None:
    """Configs never get to run code: `auto_map` / `trust_remote_code` anywhere are refused.

    Recursive, but the parse already bounded the depth (max_json_depth)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "auto_map" or (key == "trust_remote_code" and value):
                raise AdapterError(f"adapter_config.json asks for remote code ({key!r}), which is never run")
            _refuse_remote_code(value)
    elif isinstance(obj, list):
        for value in obj:
            _refuse_remote_code(value)


def _check_bounds(cfg: dict, limits: AdapterLimits) -> None:
    """Bound the work the config asks for before any regex is compiled."""
    for key in LIST_FIELDS:
        value = cfg.get(key)
        if isinstance(value, list) and len(value) > limits.max_config_list_items:
            raise AdapterError(f"{key} has {len(value)} entries; the limit is {limits.max_config_list_items} "
                               "(max_config_list_items)")
    patterns = cfg.get("layers_pattern")
    count = len(patterns) if isinstance(patterns, list) else 1 if patterns else 0
    for key in ("rank_pattern", "alpha_pattern"):
        count += len(cfg[key]) if isinstance(cfg.get(key), dict) else 0
    if count > limits.max_pattern_keys:
        raise AdapterError(f"the config holds {count} patterns (rank_pattern, alpha_pattern, layers_pattern); "
                           f"the limit is {limits.max_pattern_keys} (max_pattern_keys)")


def _refuse_common(cfg: dict) -> None:
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"bias={bias!r} is not supported: only bias='none' adapters can be served")
    if cfg.get("target_modules") is None:
        raise AdapterError("target_modules is missing from adapter_config.json")


def _lora_spec(cfg: dict) -> AdapterSpec:
    for key in LORA_UNSUPPORTED:
        if cfg.get(key):
            raise AdapterError(f"{key} is not supported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise AdapterError(f"init_lora_weights={init!r} rewrites the base weights and is not supported")
    return AdapterSpec(
        peft_type="LORA",
        r=_int(cfg.get("r", 8), "r"),
        alpha=_number(cfg.get("lora_alpha", 8), "lora_alpha"),
        use_rslora=_bool(cfg.get("use_rslora", False), "use_rslora"),
        use_dora=_bool(cfg.get("use_dora", False), "use_dora"),
        rank_pattern=pattern_map("rank_pattern", {k: _int(v, f"rank_pattern[{k!r}]")
                                                  for k, v in _dict(cfg, "rank_pattern").items()}),
        alpha_pattern=pattern_map("alpha_pattern", {k: _number(v, f"alpha_pattern[{k!r}]")
                                                    for k, v in _dict(cfg, "alpha_pattern").items()}),
        targeting=_targeting(cfg),
    )


def _miss_spec(cfg: dict, peft_type: str) -> AdapterSpec:
    if cfg.get("ensure_weight_tying"):
        raise AdapterError(f"ensure_weight_tying is a LoRA option; PEFT's {peft_type} does not tie saved modules")
    init = cfg.get("init_weights", True)
    allowed = (True, False, "bat", "mini") if peft_type == "MISS" else (True, False, "bat")
    if init not in allowed or isinstance(init, (int, float)) and not isinstance(init, bool):
        raise AdapterError(f"{peft_type} init_weights={init!r} is not supported (allowed: {allowed})")
    variant = init if isinstance(init, str) else "balance"
    mini_r = _int(cfg.get("mini_r", 1), "mini_r") if variant == "mini" else 1
    if mini_r < 1:
        raise AdapterError(f"mini_r must be >= 1, got {mini_r}")
    return AdapterSpec(peft_type=peft_type, r=_int(cfg.get("r", 64), "r"), init=variant, mini_r=mini_r,
                       targeting=_targeting(cfg))


def _modules_to_save(cfg: dict) -> tuple[str, ...]:
    """The entries as written; which modules they select (and whether we serve those) is the
    reader's check against the base model (peft_format)."""
    value = cfg.get("modules_to_save")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"modules_to_save must be a list of module names, got {value!r}")
    return tuple(dict.fromkeys(value))


def _targeting(cfg: dict) -> Targeting:
    tm = cfg.get("target_modules")
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        target: frozenset[str] | UserRegex | str = ALL_LINEAR
    elif isinstance(tm, str):
        target = user_regex("target_modules", tm)
        if cfg.get("layers_to_transform") is not None:
            raise AdapterError("layers_to_transform cannot be combined with a regex target_modules")
    elif isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm):
        target = frozenset(tm)
    else:
        raise AdapterError(f"target_modules must be a non-empty list of names or a regex string, got {tm!r}")
    ex = cfg.get("exclude_modules")
    if ex is not None and not (isinstance(ex, str) or isinstance(ex, list) and all(isinstance(e, str) for e in ex)):
        raise AdapterError(f"exclude_modules must be a list of names or a regex string, got {ex!r}")
    exclude = None if not ex else user_regex("exclude_modules", ex) if isinstance(ex, str) else frozenset(ex)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)
                                   or isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise AdapterError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
    pattern = cfg.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or isinstance(pattern, list)
                                    and all(isinstance(p, str) for p in pattern)):
        raise AdapterError(f"layers_pattern must be a string or list of strings, got {pattern!r}")
    return Targeting(
        target=target,
        exclude=exclude,
        layers_to_transform=frozenset(layers) if isinstance(layers, list) else layers,
        layers_pattern=layers_patterns([pattern] if isinstance(pattern, str) and pattern else pattern or []),
    )


def _check_ranks(spec: AdapterSpec, limits: AdapterLimits) -> None:
    for where, r in [("r", spec.r), *((f"rank_pattern[{k!r}]", v) for k, v in spec.rank_pattern.values.items())]:
        if r < 1:
            raise AdapterError(f"rank {where}={r} is invalid: must be >= 1")
        if r > limits.max_rank:
            raise AdapterError(f"rank {where}={r} is over the configured maximum rank {limits.max_rank}")
    alphas = spec.alpha_pattern.values.items()
    for where, a in [("lora_alpha", spec.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in alphas)]:
        if a < 0:
            raise AdapterError(f"{where}={a} is negative")


def _dict(cfg: dict, key: str) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{key} must be an object")
    return value


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise AdapterError(f"{what} must be an integer, got {v!r}")
    return v


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise AdapterError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise AdapterError(f"{what} must be true or false, got {v!r}")
    return v


def summary_from_config(config_path: Path) -> dict[str, Any]:
    """A best-effort record summary straight from adapter_config.json (no validation)."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError):
        cfg = {}
    peft_type = str(cfg.get("peft_type", "")).lower() or "unknown"
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if peft_type == "lora":
        variant = "dora" if cfg.get("use_dora") else "rslora" if cfg.get("use_rslora") else "lora"
    elif peft_type == "miss":
        init = cfg.get("init_weights", True)
        variant = init if isinstance(init, str) else "balance"
    else:
        variant = peft_type
    return {"type": peft_type, "variant": variant, "rank": cfg.get("r"), "target_modules": sorted(targets)}
