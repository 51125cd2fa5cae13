"""PEFT's module targeting, with every client regex compiled once on RE2.

Reproduces PEFT 0.21's `check_target_module_exists` and `get_pattern_key`
(rank/alpha patterns), so a module is adapted here exactly when PEFT would
adapt it. Each regex is compiled once per config inside the same template PEFT
formats it into, and matched in linear time (user_regex); a module's pattern
key is looked up once and remembered, as the validator asks for it repeatedly.
Work is at most keys x modules matches, with keys bounded (max_pattern_keys).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.adapters.peft.user_regex import UserRegex, user_regex

ALL_LINEAR = "all-linear"
# The templates PEFT formats a client string into (tuners_utils / utils.other).
LAYERS_PATTERN = (r"(?:^|.*?\.)", r"\.(?P<idx>\d+)\.")
PATTERN_KEY = (r"(.*\.)?(", r")$")
# PEFT's default layer index: the first numbered segment (ours, fixed, safe on `re`).
_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")

V = TypeVar("V", int, float)


def _listed(names: Set[str], name: str) -> bool:
    """PEFT's list rule `name in names or any(name.endswith('.' + n))`, in O(len(name)) set lookups."""
    if name in names:
        return True
    return any(name[i + 1:] in names for i, c in enumerate(name) if c == ".")


@dataclass(frozen=True)
class Targeting:
    """Which modules an adapter adapts (PEFT's `check_target_module_exists`)."""

    target: frozenset[str] | UserRegex | str  # names/suffixes, a regex, or ALL_LINEAR
    exclude: frozenset[str] | UserRegex | None = None
    layers_to_transform: frozenset[int] | int | None = None
    layers_pattern: tuple[UserRegex, ...] = ()

    @property
    def shown(self) -> str:
        """The target as the config gave it, for messages."""
        t = self.target
        return repr(t if isinstance(t, str) else t.source if isinstance(t, UserRegex) else sorted(t))

    def selects(self, name: str, all_linear: Set[str]) -> bool:
        ex = self.exclude
        if isinstance(ex, UserRegex) and ex.fullmatch(name) or isinstance(ex, frozenset) and _listed(ex, name):
            return False
        tm = self.target
        if isinstance(tm, UserRegex):
            return tm.fullmatch(name)
        names = all_linear if isinstance(tm, str) else tm  # ALL_LINEAR: the model's Linear layers
        if name in names:
            return True
        return _listed(names, name) and self._layer_selected(name)

    def _layer_selected(self, name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == frozenset():
            return True
        match = None
        if not self.layers_pattern:
            match = _DEFAULT_LAYER.match(name)
        else:
            for pattern in self.layers_pattern:
                match = pattern.match(name)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == wanted if isinstance(wanted, int) else idx in wanted


@dataclass(frozen=True)
class PatternMap(Generic[V]):
    """`rank_pattern` / `alpha_pattern`: the value of the first key matching a dotted suffix of a name."""

    values: Mapping[str, V]
    keys: tuple[UserRegex, ...]
    _found: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    def get(self, name: str, default: V) -> V:
        """PEFT: `pattern.get(get_pattern_key(pattern.keys(), name), default)`."""
        key = self._key_for(name)
        return self.values.get(name if key is None else key, default)

    def _key_for(self, name: str) -> str | None:
        if name not in self._found:
            self._found[name] = next((k.source for k in self.keys if k.match(name)), None)
        return self._found[name]


def pattern_map(field_name: str, values: Mapping[str, V]) -> PatternMap[V]:
    keys = tuple(user_regex(f"{field_name}[{k!r}]", k, *PATTERN_KEY) for k in values)
    return PatternMap(dict(values), keys)


def layers_patterns(patterns: Iterable[str]) -> tuple[UserRegex, ...]:
    return tuple(user_regex("layers_pattern", p, *LAYERS_PATTERN, capture=True) for p in patterns)
