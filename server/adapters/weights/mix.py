"""A weighted mix of adapters, as one adapter: what a request's `adapters: [{id, weight}]` runs on.

A linear mix of LoRAs is exactly a LoRA of the summed rank: Σ wᵢ·sᵢ·BᵢAᵢ = [B₁…Bₙ]·diag(wᵢ·sᵢ)·[A₁;…;Aₙ],
so the A's are concatenated and each member's (B·s)ᵀ, scaled by its weight, is concatenated below the
others (PEFT's `add_weighted_adapter(combination_type="cat")`). MiSS balance/mini rows are the rank-r
LoRA (fold, block) (weights/miss.py), so they take part in that concatenation too; MiSS members that all
share r are summed block by block instead (ΔW is linear in the block), which keeps rank r. Bat's ΔW
(`W·B + B` per block) is linear in its block as well: bat members of one r sum, but bat cannot join a
LoRA-form module. DoRA's column rescale is not linear in its factors: a DoRA member is refused.

A module that only some members target gets only their terms (the others add zero, as PEFT's cat gives
such a module zero rows). The result is served unmerged like any adapter: it is cached by its recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from server.adapters.weights.loaded import LoadedAdapter, ModuleWeights
from server.adapters.weights.lora import LoraWeights
from server.adapters.weights.miss import BatWeights, MissWeights
from server.errors import AdapterError, InvalidRequest

MAX_MIX_MEMBERS = 8  # members of one mix: each adds its rank to every module they share


@dataclass(frozen=True)
class MixMember:
    name: str  # the adapter id, for messages
    adapter: LoadedAdapter
    weight: float


def check_members(ids: Sequence[str], weights: Sequence[float]) -> None:
    """What any mix must satisfy before a member is looked up (the API's schema checks the same)."""
    if not 1 <= len(ids) <= MAX_MIX_MEMBERS:
        raise InvalidRequest(f"adapters: a mix has 1 to {MAX_MIX_MEMBERS} members, got {len(ids)}")
    seen = [i for n, i in enumerate(ids) if i in ids[:n]]
    if seen:
        raise InvalidRequest(f"adapters: {seen[0]!r} is listed twice; give each member once with its weight")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise InvalidRequest(f"adapters: weights must be finite numbers, got {bad[0]!r}")


def mix_adapters(members: Sequence[MixMember], max_rank: int, pin: bool = False,
                 slot_dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """The mix as one LoadedAdapter (float32 host tensors in one buffer, page-locked with `pin`); `slot_dtype`:
    what the device slots hold, whose range the mixed factors must fit (float16: 65504)."""
    check_members([m.name for m in members], [m.weight for m in members])
    for m in members:
        _refuse_dora(m)
        _refuse_saved(m)
    names = sorted({n for m in members for n in m.adapter.modules})
    modules = {name: _mix_module(name, [(m, m.adapter.modules[name]) for m in members if name in m.adapter.modules])
               for name in names}
    rank = max(w.rank for w in modules.values())
    if rank > max_rank:
        worst = next(n for n, w in modules.items() if w.rank == rank)
        raise AdapterError(f"the mix's summed rank is {rank} (module {worst!r}: the members' ranks add up when "
                           f"they are concatenated), over the configured maximum rank {max_rank}")
    modules = _packed(modules, pin, slot_dtype)
    kinds = {"miss" if isinstance(w, (MissWeights, BatWeights)) else "lora" for w in modules.values()}
    return LoadedAdapter(kind=kinds.pop() if len(kinds) == 1 else "lora", variant="mix", rank=rank,
                         target_modules=tuple(names), modules=modules,
                         nbytes=sum(w.nbytes for w in modules.values()))


def _refuse_dora(m: MixMember) -> None:
    if any(isinstance(w, LoraWeights) and w.dora_scale is not None for w in m.adapter.modules.values()):
        raise AdapterError(f"adapter {m.name!r} is a DoRA adapter, which cannot be mixed: DoRA rescales each "
                           "output column by a norm of its own adapted weight, so a weighted sum of DoRA adapters "
                           "is not a DoRA (or LoRA) adapter")


def _refuse_saved(m: MixMember) -> None:
    if m.adapter.saved:
        raise AdapterError(f"adapter {m.name!r} carries whole-module copies (modules_to_save: "
                           f"{', '.join(m.adapter.saved.names())}), which cannot be mixed: a weighted mix is a sum "
                           "of low-rank updates, and a module copy replaces its module outright")


def _mix_module(name: str, parts: list[tuple[MixMember, ModuleWeights]]) -> ModuleWeights:
    bats = [w for _, w in parts if isinstance(w, BatWeights)]
    if bats:
        return _sum_bat(name, parts)
    misses = [w for _, w in parts if isinstance(w, MissWeights)]
    if len(misses) == len(parts) and len({w.rank for w in misses}) == 1:
        return _sum_miss(parts)  # type: ignore[arg-type]
    return _cat(parts)


def _sum_bat(name: str, parts: list[tuple[MixMember, ModuleWeights]]) -> BatWeights:
    """Bat: ΔW = W·B + B per r×r block is linear in B, so blocks of one r sum exactly."""
    kinds = {type(w) for _, w in parts}
    ranks = {w.rank for _, w in parts}
    if kinds != {BatWeights} or len(ranks) != 1:
        who = ", ".join(f"{m.name!r} ({_describe(w)})" for m, w in parts)
        raise AdapterError(f"module {name!r} cannot be mixed: a MiSS bat adapter mixes only with bat adapters of "
                           f"the same r (its update multiplies the base weight), got {who}")
    block = sum(m.weight * w.block.to(torch.float32) for m, w in parts)  # [out/r, r, r]
    return BatWeights(block)  # type: ignore[arg-type]


def _sum_miss(parts: list[tuple[MixMember, MissWeights]]) -> MissWeights:
    """MiSS members of one r: the weighted sum of their blocks (mini blocks tiled to full width when the
    members' widths differ)."""
    first = parts[0][1]
    same = len({tuple(w.block.shape) for _, w in parts}) == 1
    blocks = [w.block if same else w.factors()[1] for _, w in parts]  # [r, mini_r] or [r, out]
    block = sum(m.weight * b.to(torch.float32) for (m, _), b in zip(parts, blocks))
    return MissWeights(block, first.in_features, first.out_features)  # type: ignore[arg-type]


def _cat(parts: list[tuple[MixMember, ModuleWeights]]) -> LoraWeights:
    """LoRA form: A's stacked `[Σr, in]`, weighted (B·s)ᵀ's stacked `[Σr, out]`."""
    factors = [(m.weight, w.factors()) for m, w in parts]  # type: ignore[union-attr]
    a = torch.cat([f[0].to(torch.float32) for _, f in factors])
    bt = torch.cat([weight * f[1].to(torch.float32) for weight, f in factors])
    return LoraWeights(a, bt, embedding=parts[0][1].embedding)


def _describe(w: ModuleWeights) -> str:
    if isinstance(w, BatWeights):
        return f"bat, r={w.rank}"
    if isinstance(w, MissWeights):
        return f"MiSS, r={w.rank}"
    return f"LoRA, r={w.rank}"


def _packed(modules: dict[str, ModuleWeights], pin: bool, slot_dtype: torch.dtype) -> dict[str, ModuleWeights]:
    """Every tensor moved into one flat buffer: one host allocation per mix (one upload to a GPU's slots),
    and one finite check of the whole mix (weights as large as float32 allows may overflow it)."""
    tensors = [t for w in modules.values() for t in _tensors(w)]
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, pin_memory=pin)  # [numel]
    views, used = [], 0
    for t in tensors:
        views.append(flat[used:used + t.numel()].view(t.shape))
        views[-1].copy_(t)
        used += t.numel()
    if not bool(torch.isfinite(flat).all()):
        raise AdapterError("the mix overflows float32: its weights are too large for these adapters")
    limit = torch.finfo(slot_dtype).max
    if flat.numel() and float(flat.abs().max()) > limit:
        raise AdapterError(f"the mix's weights scale its factors past what this server's {slot_dtype} adapter "
                           f"slots hold (at most {limit:.0f}); use smaller weights")
    taken = iter(views)
    return {name: _rebuilt(w, taken) for name, w in modules.items()}


def _tensors(w: ModuleWeights) -> list[torch.Tensor]:
    if isinstance(w, LoraWeights):
        return [w.a, w.bt]
    return [w.block]


def _rebuilt(w: ModuleWeights, views: Iterator[torch.Tensor]) -> ModuleWeights:
    if isinstance(w, LoraWeights):
        return LoraWeights(next(views), next(views), embedding=w.embedding)
    if isinstance(w, MissWeights):
        return MissWeights(next(views), w.in_features, w.out_features)
    return BatWeights(next(views))
