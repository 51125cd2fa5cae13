"""`modules_to_save` in PEFT's format: which base modules an adapter replaces whole, and their copies.

PEFT wraps every module whose name ends with an entry (a plain suffix match, its
`_set_trainable`) and saves the wrapper's copy under the module's own key,
`base_model.model.<module>.weight`. We serve such copies for the input embedding and
the head only (module_copies.py explains why they share a pool); any other match is
refused by name, as is an entry that matches nothing (PEFT would quietly train nothing).

Tied embeddings, as PEFT does them: on a base whose head shares the input embedding's
weight, `ensure_weight_tying: true` with `embed_tokens` or `lm_head` among the entries makes
PEFT wrap both modules around *one* copy (the file holds it under both keys); without
it each saved module gets its own copy and the other keeps reading the base weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.adapters.peft.peft_config import AdapterSpec
from server.adapters.peft.safetensors_check import FLOAT_DTYPES, TensorInfo
from server.adapters.weights.saved_modules import SavedModules
from server.errors import AdapterError

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names that ensure_weight_tying looks for
MiB = 1024 * 1024


@dataclass(frozen=True)
class Saveable:
    """What the base model allows: module name -> its weight (`[vocab, hidden]`), tying, copy-pool rows."""

    weights: dict[str, torch.Tensor]
    tied: bool  # the head's weight is the input embedding's
    pool_rows: int  # copies the module-copy budget holds on this model
    budget: int  # that budget, bytes


@dataclass(frozen=True)
class SavePlan:
    modules: tuple[str, ...] = ()  # base modules replaced whole
    tied: bool = False  # one copy for all of them
    keys: dict[str, str] = field(default_factory=dict)  # tensor key (past PEFT's prefix) -> module name

    @property
    def copies(self) -> int:
        return 1 if self.tied else len(self.modules)


def plan_saved(spec: AdapterSpec, names: list[str], base: Saveable, targeted: set[str]) -> SavePlan:
    """Resolve the config's entries against the base model's module `names`, as PEFT would, or refuse."""
    if not spec.modules_to_save:
        return SavePlan()
    selected: set[str] = set()
    allowed = ", ".join(sorted(base.weights)) or "none on this model"
    for entry in spec.modules_to_save:
        matched = [n for n in names if n and n.endswith(entry)]
        if not matched:
            raise AdapterError(f"modules_to_save entry {entry!r} matches no module of the base model")
        for name in matched:
            if name not in base.weights:
                raise AdapterError(f"modules_to_save entry {entry!r} selects module {name!r}, which cannot be "
                                   f"replaced whole here: only the input embedding and the output head can "
                                   f"({allowed})")
        selected.update(matched)
    tied = spec.ensure_weight_tying and base.tied and any(
        e.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for e in spec.modules_to_save)
    if tied:
        selected = set(base.weights)
    both = sorted(selected & targeted)
    if both:
        raise AdapterError(f"module {both[0]!r} is both adapted (target_modules) and replaced whole "
                           "(modules_to_save); an adapter may do only one to a module")
    plan = SavePlan(tuple(sorted(selected)), tied, {f"{n}.weight": n for n in selected})
    _check_pool(plan, base)
    return plan


def refuse_tied_target(spec: AdapterSpec, base: Saveable, targeted: set[str]) -> None:
    """PEFT with ensure_weight_tying puts a LoRA on the tied head too when the embedding is a target
    (and modules_to_save names neither): a LoRA we would not serve on the head, so refused."""
    if spec.ensure_weight_tying and base.tied and not spec.modules_to_save and targeted & set(base.weights):
        raise AdapterError("ensure_weight_tying with a LoRA on the tied input embedding (PEFT then adapts "
                           "lm_head with it) is not supported")


def _check_pool(plan: SavePlan, base: Saveable) -> None:
    if plan.copies <= base.pool_rows:
        return
    weight = base.weights[plan.modules[0]]
    each = weight.numel() * weight.element_size()
    raise AdapterError(
        f"modules_to_save: this adapter brings {plan.copies} whole-module "
        f"{'copy' if plan.copies == 1 else 'copies'} ({', '.join(plan.modules)}) of {each / MiB:.1f} MiB each "
        f"on this model; the module-copy budget of {base.budget / MiB:.0f} MiB (module_copy_budget_mb) holds "
        f"{base.pool_rows}: it needs at least {plan.copies * each / MiB:.0f} MiB")


def split_saved(infos: dict[str, TensorInfo], plan: SavePlan, prefix: str) -> dict[str, TensorInfo]:
    """Take the saved modules' tensors out of `infos` (in place); module name -> its weight's tensor.
    A module's other tensors (a bias) stay behind and are refused as unexpected by the caller."""
    found: dict[str, TensorInfo] = {}
    for key in [k for k in infos if k.startswith(prefix) and k[len(prefix):] in plan.keys]:
        found[plan.keys[key[len(prefix):]]] = infos.pop(key)
    for name, info in found.items():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {info.name!r} has dtype {info.dtype}; saved modules must be floating point")
    missing = [n for n in plan.modules if n not in found]
    if plan.tied and len(missing) == len(plan.modules) or not plan.tied and missing:
        raise AdapterError(f"modules_to_save: module {missing[0]!r} has no weight ({prefix}{missing[0]}.weight) "
                           "in adapter_model.safetensors")
    return found


def check_saved_shapes(found: dict[str, TensorInfo], base: Saveable) -> None:
    for name, info in found.items():
        expected = tuple(base.weights[name].shape)
        if info.shape != expected:
            raise AdapterError(f"tensor {info.name!r} has shape {list(info.shape)} but module {name!r} of the base "
                               f"model has {list(expected)} (a resized vocabulary cannot be served)")


def load_saved(path: Path, found: dict[str, TensorInfo], plan: SavePlan, base: Saveable,
               pin: bool = False) -> SavedModules:
    """The copies in the base weights' dtype (the dtype PEFT loads them into), finite or refused."""
    copies: dict[str, torch.Tensor] = {}
    with path.open("rb") as f:
        for name, info in found.items():
            weight = base.weights[name]
            raw = bytearray(info.nbytes)
            f.seek(info.offset)
            if f.readinto(raw) != info.nbytes:
                raise AdapterError("adapter_model.safetensors changed while it was being read")
            stored = torch.frombuffer(raw, dtype=FLOAT_DTYPES[info.dtype]).view(info.shape)
            copies[name] = torch.empty(info.shape, dtype=weight.dtype, pin_memory=pin).copy_(stored)
            if not bool(torch.isfinite(copies[name]).all()):
                raise AdapterError(f"tensor {info.name!r} contains NaN or Inf (or overflows "
                                   f"{str(weight.dtype).removeprefix('torch.')})")
    if plan.tied:
        first = copies[min(copies)]
        for name, other in copies.items():
            if not torch.equal(other, first):
                raise AdapterError(f"ensure_weight_tying: the saved copies of {min(copies)!r} and {name!r} differ, "
                                   "but on this tied base they are one module")
        copies = {name: first for name in plan.modules}
    return SavedModules(copies)
