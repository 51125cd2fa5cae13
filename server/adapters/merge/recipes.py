"""Merge recipes: a new stored LoRA adapter from weighted LoRA members, as PEFT's `add_weighted_adapter` builds it.

`cat` concatenates the members (exact: the per-request mix, stored); `linear`, `ties`,
`dare_linear`, `dare_ties` and `magnitude_prune` combine the members' A's and, apart,
their B's (members of one rank), each weighted by ±√|w·s| on A and √|w·s| on B, as
PEFT 0.21 does (its svd variants are not offered). The task-arithmetic operations
below are PEFT's `peft.utils.merge_utils` (Apache-2.0), ported because PEFT is not a
serving dependency; DARE draws its masks from a generator seeded by the recipe, in
PEFT's order (modules in model order, A's then B's, members in the recipe's order),
so a recipe is reproducible and equals PEFT run from that seed. The output is PEFT's
own format (scaling 1: `lora_alpha` = r), validated and published like an upload.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from server.adapters.peft.peft_config import AdapterSpec, parse_config
from server.adapters.peft.peft_format import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from server.adapters.runtime.inject import module_table
from server.adapters.weights.lora import lora_scale
from server.errors import AdapterError, InvalidRequest
from server.adapters.limits import AdapterLimits

Combination = Literal["cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
COMBINATIONS: tuple[str, ...] = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need a density
SIGNED = ("ties", "dare_ties")  # elect a majority sign
RANDOM = ("dare_linear", "dare_ties")  # need a seed


@dataclass(frozen=True)
class Recipe:
    combination: str
    weights: tuple[float, ...]  # one per member, in order
    density: float | None = None
    majority_sign_method: str | None = None  # ties / dare_ties: "total" (the default) or "frequency"
    seed: int | None = None

    def record(self, members: Sequence[str]) -> dict[str, Any]:
        """How the stored adapter was made, for its record."""
        return {"combination_type": self.combination, "members": list(members), "weights": list(self.weights),
                "density": self.density, "majority_sign_method": self.majority_sign_method, "seed": self.seed}

    def check(self) -> None:
        """What each combination needs, and nothing it would ignore."""
        c = self.combination
        if c not in COMBINATIONS:
            raise InvalidRequest(f"combination_type {c!r} is not offered; use one of {', '.join(COMBINATIONS)}")
        if (self.density is not None) != (c in PRUNED):
            raise InvalidRequest(f"density is required with {', '.join(PRUNED)} and only then (got "
                                 f"combination_type {c!r})")
        if self.density is not None and not 0 < self.density <= 1:
            raise InvalidRequest(f"density must be in (0, 1], got {self.density}")
        if (self.seed is not None) != (c in RANDOM):
            raise InvalidRequest(f"seed is required with {', '.join(RANDOM)} (DARE's random pruning) and only then")
        if self.majority_sign_method is not None and c not in SIGNED:
            raise InvalidRequest(f"majority_sign_method applies to {', '.join(SIGNED)} only")
        if self.majority_sign_method not in (None, "total", "frequency"):
            raise InvalidRequest("majority_sign_method must be 'total' or 'frequency'")


@dataclass(frozen=True)
class Member:
    name: str
    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]  # PEFT's keys

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A `[r, in]`, B `[out, r]`) of `module` as stored, or None when this member does not adapt it."""
        key = PEFT_PREFIX + module
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key + a in self.tensors:
                return self.tensors[key + a], self.tensors[key + b]
        return None

    def scale(self, module: str) -> float:
        spec = self.spec
        return lora_scale(spec.module_alpha(module), spec.module_rank(module), spec.use_rslora)

    @property
    def max_rank(self) -> int:
        return max([self.spec.r, *self.spec.rank_pattern.values.values()])


def read_member(name: str, path: Path, limits: AdapterLimits) -> Member:
    """A member's config and tensors as stored (the caller validated the files with the server's reader)."""
    spec = parse_config((path / CONFIG_NAME).read_bytes(), limits)
    if spec.peft_type != "LORA":
        raise AdapterError(f"adapter {name!r} is a {spec.peft_type} adapter: merge recipes combine LoRA adapters "
                           "(PEFT's add_weighted_adapter); mix MiSS adapters per request instead")
    if spec.use_dora:
        raise AdapterError(f"adapter {name!r} is a DoRA adapter, which a merge recipe cannot combine exactly")
    if spec.modules_to_save:
        raise AdapterError(f"adapter {name!r} carries whole-module copies (modules_to_save), which a merge recipe "
                           "cannot combine: recipes sum low-rank updates, a module copy replaces its module")
    return Member(name, spec, {k: t.to(torch.float32) for k, t in load_file(path / WEIGHTS_NAME).items()})


def write_recipe(members: Sequence[Member], recipe: Recipe, model: nn.Module, out: Path) -> None:
    """The combined adapter, in PEFT's format, into `out` (for `model`, whose module order DARE's draws follow)."""
    recipe.check()
    module_order = list(module_table(model))
    if len(recipe.weights) != len(members):
        raise InvalidRequest("one weight per member")
    rank = _new_rank(members, recipe.combination)
    generator = torch.Generator().manual_seed(recipe.seed) if recipe.seed is not None else None
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for module in module_order:
        parts = [(m, w, f) for m, w in zip(members, recipe.weights) if (f := m.factors(module)) is not None]
        if not parts:
            continue
        a, b = _combine(module, parts, recipe, rank, generator)
        embedding = any(PEFT_PREFIX + module + ".lora_embedding_A" in m.tensors for m, _, _ in parts)
        names = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
        tensors[PEFT_PREFIX + module + names[0]] = a.contiguous()
        tensors[PEFT_PREFIX + module + names[1]] = b.contiguous()
        targets.append(module)
    save_file(tensors, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(_config(rank, targets)))


def _new_rank(members: Sequence[Member], combination: str) -> int:
    ranks = [m.max_rank for m in members]
    if combination == "cat":
        return sum(ranks)
    if len(set(ranks)) != 1:
        raise AdapterError(f"combination_type {combination!r} needs members of one rank (PEFT's rule), got "
                           + ", ".join(f"{m.name!r}: r={r}" for m, r in zip(members, ranks)))
    return ranks[0]


def _combine(module: str, parts: list, recipe: Recipe, rank: int,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A `[rank, in]`, B `[out, rank]`) of one module."""
    if recipe.combination == "cat":  # PEFT: A·w·s stacked, B's side by side, zero-padded to the summed rank
        a = torch.cat([f[0] * w * m.scale(module) for m, w, f in parts], dim=0)
        b = torch.cat([f[1] for _, _, f in parts], dim=1)
        a_out = torch.zeros(rank, a.shape[1], dtype=a.dtype)
        b_out = torch.zeros(b.shape[0], rank, dtype=b.dtype)
        a_out[:a.shape[0]], b_out[:, :b.shape[1]] = a, b
        return a_out, b_out
    shapes = {tuple(f[0].shape) for _, _, f in parts}
    if len(shapes) != 1 or next(iter(shapes))[0] != rank:
        raise AdapterError(f"module {module!r}: combination_type {recipe.combination!r} needs every member's "
                           f"factors at rank {rank} there (a rank_pattern differs)")
    signed = [w * m.scale(module) for m, w, _ in parts]
    weights_a = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in signed])
    weights_b = torch.tensor([math.sqrt(abs(s)) for s in signed])
    dtype = parts[0][2][0].dtype
    a = _task_merge([f[0] for _, _, f in parts], weights_a, recipe, generator)
    b = _task_merge([f[1] for _, _, f in parts], weights_b, recipe, generator)
    return a.to(dtype), b.to(dtype)


def _config(rank: int, targets: list[str]) -> dict[str, Any]:
    """PEFT's config of the new adapter: r = lora_alpha = the new rank (scaling 1), every module by full name."""
    return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets, "use_rslora": False,
            "use_dora": False, "bias": "none", "task_type": "CAUSAL_LM", "rank_pattern": {}, "alpha_pattern": {}}


# --- PEFT's task arithmetic (peft.utils.merge_utils, 0.21), the draws on an explicit generator ---------------

def _task_merge(tensors: list[torch.Tensor], weights: torch.Tensor, recipe: Recipe,
                generator: torch.Generator | None) -> torch.Tensor:
    c, density = recipe.combination, recipe.density or 1.0
    if c in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif c in RANDOM:
        tensors = [_prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # [members, ...]
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if c not in SIGNED:
        return weighted.sum(dim=0)
    mask = _majority_sign_mask(stacked, recipe.majority_sign_method or "total")
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, fill_value=density), generator=generator)
    return t * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)
