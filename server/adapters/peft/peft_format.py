"""Reading and validating an adapter directory in PEFT's `save_pretrained` format.

Order matters: config first (cheap refusals), then the safetensors layout
(bounded, no allocation), then names and shapes against the base model (still
no allocation), and only then the tensors themselves (finite check, compute form).
Whole-module copies (`modules_to_save`) follow the same order (saved_modules.py).
The same function validates uploads for the store and loads for the cache.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.adapters.runtime.inject import ModuleInfo, all_linear_names, copy_modules, copy_pool_rows, module_table
from server.adapters.peft.arena import Arena
from server.adapters.peft.carve import Piece, carve, source
from server.adapters.weights.loaded import LoadedAdapter, ModuleWeights
from server.adapters.weights.lora import LoraWeights, dora_scale, lora_scale
from server.adapters.weights.miss import BatWeights, MissWeights
from server.adapters.peft.peft_config import AdapterSpec, parse_config
from server.adapters.peft.safetensors_check import FLOAT_DTYPES, TensorInfo, check_safetensors
from server.adapters.peft.saved_modules import (Saveable, check_saved_shapes, load_saved, plan_saved,
                                                refuse_tied_target, split_saved)
from server.errors import AdapterError
from server.model.quantize import dense_weight
from server.adapters.limits import AdapterLimits

# PEFT's on-disk names, for every reader and writer in the server (store, upload, trainer export).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_PREFIX = "base_model.model."  # every tensor key starts so: PEFT's wrapper path
# Tensor-name suffix -> role, per adapter type.
SUFFIXES = {
    "LORA": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "EA",
             ".lora_embedding_B": "EB", ".base_layer.weight": "BASE", ".lora_magnitude_vector": "M"},
    "MISS": {".miss_block": "BLOCK"},
    "BONE": {".bone_block": "BLOCK"},
}
# Names that identify a refused feature even when the config hides it.
TELLTALE = {".lora_B.bias": "lora_bias is not supported"}
DORA_HIDDEN = "DoRA magnitude tensors (lora_magnitude_vector) in an adapter whose config does not set use_dora"


@dataclass(frozen=True)
class _Base:
    table: dict[str, ModuleInfo]
    all_linear: set[str]
    copyable: dict[str, torch.Tensor]  # modules an adapter may replace whole -> their base weight
    tied: bool  # the head shares the input embedding's weight

    def saveable(self, model: Any, limits: AdapterLimits) -> Saveable:
        return Saveable(self.copyable, self.tied, copy_pool_rows(model, limits, limits.max_adapters_resident),
                        limits.module_copy_budget)


def read_adapter(path: Path, base: Any, limits: AdapterLimits) -> LoadedAdapter:
    """Validate and load `path` (adapter_config.json + adapter_model.safetensors) for `base`."""
    path = Path(path)
    _refuse_pickles(path)
    spec = parse_config(_read_config(path), limits)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(f"{WEIGHTS_NAME} is missing (only safetensors weights are accepted)")
    infos = check_safetensors(weights_path, limits.max_adapter_bytes)
    model_base = _base_of(base.model)
    saveable = model_base.saveable(base.model, limits)
    targeted = {n for n in model_base.table if n and spec.targets(n, model_base.all_linear)}
    refuse_tied_target(spec, saveable, targeted)
    plan = plan_saved(spec, list(model_base.table), saveable, targeted)
    saved_infos = split_saved(infos, plan, PEFT_PREFIX)
    roles = _tensors_by_module(infos, spec)
    _check_targets(spec, roles, model_base)
    for name, parts in roles.items():
        _check_shapes(spec, model_base.table[name], parts)
    check_saved_shapes(saved_infos, saveable)
    # float32 host copy whatever the model's dtype: the slots round it once, and a merge (float32 math)
    # starts from the file's unrounded factors; a 16-bit model's adapters cost 2x the host bytes.
    # Pinned when the slots are on a GPU: their copies then run asynchronously, off the engine thread.
    modules = _load(weights_path, spec, roles, model_base, torch.float32, pin=base.device.type == "cuda")
    _check_slot_range(modules, limits, base.dtype)
    saved = load_saved(weights_path, saved_infos, plan, saveable, pin=base.device.type == "cuda")
    return LoadedAdapter(
        kind=spec.kind,
        variant=spec.variant,
        rank=max(w.rank for w in modules.values()),
        target_modules=tuple(sorted(modules)),
        modules=modules,
        nbytes=sum(w.nbytes for w in modules.values()) + saved.nbytes,
        saved=saved,
    )


_bases: weakref.WeakKeyDictionary[Any, _Base] = weakref.WeakKeyDictionary()
_bases_lock = threading.Lock()


def _base_of(model: Any) -> _Base:
    """The model's module table, walked once per model (the same before and after injection)."""
    with _bases_lock:
        found = _bases.get(model)
        if found is None:
            copyable = {name: mod.weight for name, mod in copy_modules(model).items()}
            found = _bases[model] = _Base(table := module_table(model), all_linear_names(model, table), copyable,
                                          _tied(model))
        return found


def _tied(model: Any) -> bool:
    """Whether the head reads the input embedding's weight (transformers' tie_word_embeddings)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _refuse_pickles(path: Path) -> None:
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path.name!r} does not exist")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(f"pickled weights ({', '.join(pickled)}) are refused: upload adapter_model.safetensors")


def _read_config(path: Path) -> bytes:
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise AdapterError(f"{CONFIG_NAME} is missing")
    with cfg.open("rb") as f:
        return f.read(2 * 1024 * 1024)


def _tensors_by_module(infos: dict[str, TensorInfo], spec: AdapterSpec) -> dict[str, dict[str, TensorInfo]]:
    """Module name -> role -> tensor, refusing any tensor that is not part of the format."""
    roles: dict[str, dict[str, TensorInfo]] = {}
    for key, info in infos.items():
        for telltale, message in TELLTALE.items():
            if telltale in key:
                raise AdapterError(message)
        if "lora_magnitude_vector" in key and not spec.use_dora:
            raise AdapterError(DORA_HIDDEN)
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"unexpected tensor {key!r}: PEFT keys start with {PEFT_PREFIX!r}")
        rest = key[len(PEFT_PREFIX):]
        for suffix, role in SUFFIXES[spec.peft_type].items():
            if rest.endswith(suffix):
                name = rest[: -len(suffix)]
                if role in roles.setdefault(name, {}):
                    raise AdapterError(f"duplicate tensor for {name!r} ({role})")
                roles[name][role] = info
                break
        else:
            raise AdapterError(f"unexpected tensor {key!r} for a {spec.peft_type} adapter")
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {info.dtype}; adapters must be floating point")
    if not roles:
        raise AdapterError(f"{WEIGHTS_NAME} holds no adapter tensors")
    return roles


def _check_targets(spec: AdapterSpec, roles: dict[str, dict], base: _Base) -> None:
    """Config, tensors and base model must agree: config first, then every tensor, then every target."""
    targeted = sorted(n for n in base.table if n and spec.targets(n, base.all_linear))
    if not targeted:
        raise AdapterError(f"target_modules {spec.targeting.shown} match no module of the base model; its "
                           f"adaptable modules are named {_names(base)}")
    supported = ("linear", "embedding") if spec.peft_type == "LORA" else ("linear",)
    for name in targeted:
        kind = base.table[name].kind
        if kind not in supported:
            what = "an Embedding" if kind == "embedding" else "neither a Linear nor an Embedding"
            raise AdapterError(f"target module {name!r} is {what} module, which {spec.peft_type} cannot adapt")
        if spec.use_dora and kind != "linear":
            raise AdapterError(f"DoRA (use_dora) on target module {name!r}, an Embedding module, is not "
                               "supported: DoRA is served on Linear modules only")
    for name in sorted(roles):
        if name not in base.table:
            raise AdapterError(f"unknown target module {name!r}: the base model has no such module")
        if not spec.targets(name, base.all_linear):
            raise AdapterError(f"tensors for module {name!r}, which target_modules does not select")
    for name in targeted:
        if name not in roles or set(roles[name]) <= {"BASE"}:
            raise AdapterError(f"target module {name!r} has no weights in {WEIGHTS_NAME} (target_modules "
                               f"{spec.targeting.shown} select {len(targeted)} modules of this model)")


def _names(base: _Base) -> str:
    """This model's Linear/Embedding module names, by last component (Phi-3: qkv_proj, gate_up_proj, ...)."""
    return ", ".join(sorted({n.rpartition(".")[2] for n, i in base.table.items() if n and i.kind != "other"}))


def _check_shapes(spec: AdapterSpec, info: ModuleInfo, parts: dict[str, TensorInfo]) -> None:
    if spec.peft_type == "LORA":
        _check_lora(spec, info, parts)
    else:
        _check_miss(spec, info, parts["BLOCK"])


def _check_lora(spec: AdapterSpec, info: ModuleInfo, parts: dict[str, TensorInfo]) -> None:
    r = spec.module_rank(info.name)
    emb = info.kind == "embedding"
    need = {"EA", "EB"} if emb else {"A", "B", "M"} if spec.use_dora else {"A", "B"}
    allowed = need | ({"BASE"} if emb else set())
    if spec.use_dora and not emb and "M" not in parts:
        raise AdapterError(f"module {info.name!r}: use_dora is set but its DoRA magnitude tensor "
                           "(lora_magnitude_vector) is missing")
    if not need <= set(parts) or not set(parts) <= allowed:
        raise AdapterError(f"module {info.name!r}: expected tensors {sorted(need)} for a {info.kind} module, "
                           f"found {sorted(parts)}")
    a, b = (parts["EA"], parts["EB"]) if emb else (parts["A"], parts["B"])
    _expect_shape(info, a, (r, info.in_features))
    _expect_shape(info, b, (info.out_features, r))
    if "BASE" in parts:
        _expect_shape(info, parts["BASE"], (info.in_features, info.out_features))
    if "M" in parts:
        _expect_shape(info, parts["M"], (info.out_features,))


def _check_miss(spec: AdapterSpec, info: ModuleInfo, block: TensorInfo) -> None:
    r, n_in, n_out = spec.r, info.in_features, info.out_features
    if spec.init == "bat":
        if n_in % r or n_out % r:
            raise AdapterError(f"module {info.name!r}: bat needs in/out features ({n_in}, {n_out}) divisible by r={r}")
        expected: tuple[int, ...] = (n_out // r, r, r)
    elif spec.init == "mini":
        if n_out % spec.mini_r:
            raise AdapterError(f"module {info.name!r}: out_features {n_out} is not divisible by mini_r={spec.mini_r}")
        expected = (r, spec.mini_r)
    else:
        expected = (r, n_out)
    if r > n_in:
        raise AdapterError(f"module {info.name!r}: r={r} exceeds in_features {n_in}")
    _expect_shape(info, block, expected)


def _expect_shape(info: ModuleInfo, t: TensorInfo, expected: tuple[int, ...]) -> None:
    if t.shape != expected:
        raise AdapterError(f"tensor {t.name!r} has shape {list(t.shape)} but module {info.name!r} of the base "
                           f"model needs {list(expected)}")


def _load(path: Path, spec: AdapterSpec, roles: dict[str, dict[str, TensorInfo]], base: _Base,
          dtype: torch.dtype, pin: bool = False) -> dict[str, ModuleWeights]:
    infos = [t for parts in roles.values() for t in parts.values()]
    with _read_buffer(path, max(t.offset + t.nbytes for t in infos)) as whole:
        names = sorted(roles)
        pieces: list[Piece] = []
        for name in names:
            info, parts = base.table[name], roles[name]
            if "BASE" in parts:  # compared, never kept (equal to the base weight implies finite)
                _check_base_copy(info, source(whole, parts["BASE"]))
            pieces.extend(_pieces(spec, info, parts))
        # Own the bytes, in one buffer per adapter: the read buffer is reused by this thread's next load.
        arena = Arena(sum(p.numel for p in pieces), dtype, pin=pin)
        views = iter(carve(whole, pieces, arena))
        modules = {name: _module_weights(spec, base.table[name], views) for name in names}
        _check_finite(arena.flat, lambda: {p.src.name: source(whole, p.src) for p in pieces})
    return modules


def _pieces(spec: AdapterSpec, info: ModuleInfo, parts: dict[str, TensorInfo]) -> list[Piece]:
    """What a module keeps, in the order `_module_weights` takes it back: LoRA A then (B·s)ᵀ (then DoRA's
    magnitude), or the block."""
    if spec.peft_type != "LORA":
        return [Piece(parts["BLOCK"])]
    a, b = (parts["EA"], parts["EB"]) if info.kind == "embedding" else (parts["A"], parts["B"])
    scale = lora_scale(spec.module_alpha(info.name), spec.module_rank(info.name), spec.use_rslora)
    return [Piece(a), Piece(b, scale)] + ([Piece(parts["M"])] if "M" in parts else [])


_buffers = threading.local()
REUSED_BUFFER_MAX = 64 * 1024 * 1024  # bigger files get a one-off buffer


@contextlib.contextmanager
def _read_buffer(path: Path, end: int) -> Iterator[torch.Tensor]:
    """The file's first `end` bytes as a uint8 tensor `[end]`, read with one call.

    Why not a memory map: faulting hundreds of tensors in page by page and then
    copying them costs more than one read into a buffer this loader thread keeps
    (warm pages, no allocation). Nothing may keep a view of it past this block.
    """
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < end:
        buf = bytearray(end)
        if end <= REUSED_BUFFER_MAX:
            _buffers.buf = buf
    view = memoryview(buf)[:end]
    with path.open("rb") as f:
        got = f.readinto(view)
    if got != end:
        raise AdapterError(f"{WEIGHTS_NAME} changed while it was being read")
    try:
        yield torch.frombuffer(buf, dtype=torch.uint8, count=end)
    finally:
        view.release()


def _check_slot_range(modules: dict[str, ModuleWeights], limits: AdapterLimits, model_dtype: torch.dtype) -> None:
    """float16 slots (limits.slot_dtype, or None on a float16 model) hold magnitudes up to 65504: a
    factor beyond that would become inf in its slot, so the adapter is refused here, at load, with the reason."""
    slot_dtype = model_dtype if limits.slot_dtype is None else limits.slot_dtype
    if slot_dtype != torch.float16:
        return
    limit = torch.finfo(torch.float16).max
    for name, weights in modules.items():
        if weights.batched:  # MiSS: its slot Bᵀ tiles the block, the fold matrix is 0/1
            tensors = (weights.a, weights.bt) if isinstance(weights, LoraWeights) else (weights.block,)
            peak = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
            if peak > limit:
                raise AdapterError(f"{name}: a weight of magnitude {peak:.3g} does not fit the float16 adapter "
                                   f"slots this server uses (float16, at most {limit:.0f})")


def _check_finite(flat: torch.Tensor, stored: Callable[[], dict[str, torch.Tensor]]) -> None:
    """NaN/Inf anywhere makes the sum non-finite: one pass over the packed weights decides
    the common case; only then are the stored tensors checked one by one, to name the bad one."""
    if bool(torch.isfinite(flat.sum(dtype=torch.float32))):
        return
    for name, tensor in stored().items():
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {name!r} contains NaN or Inf")
    if not bool(torch.isfinite(flat).all()):  # finite as stored, not once scaled / cast
        raise AdapterError(f"adapter weights overflow the serving dtype {str(flat.dtype).removeprefix('torch.')}")


def _module_weights(spec: AdapterSpec, info: ModuleInfo, views: Iterator[torch.Tensor]) -> ModuleWeights:
    """The module's compute form from its carved views (taken in `_pieces`' order)."""
    if spec.peft_type == "LORA":
        a, bt = next(views), next(views)  # [r, in], [r, out]
        if not spec.use_dora:
            return LoraWeights(a, bt, embedding=info.kind == "embedding")
        assert info.weight is not None
        magnitude = next(views)  # [out]: overwritten by g, in its arena bytes
        scale = dora_scale(magnitude, a, bt, dense_weight(info.weight))  # a quantized base: its values
        if not bool(torch.isfinite(scale).all()) and all(bool(torch.isfinite(t).all()) for t in (magnitude, a, bt)):
            raise AdapterError(f"module {info.name!r}: DoRA's column norm ‖W + s·BA‖ is zero in an output row of "
                               "this base model, where DoRA's output is undefined (PEFT's is NaN)")
        magnitude.copy_(scale)
        return LoraWeights(a, bt, dora_scale=magnitude)
    block = next(views)
    if spec.init == "bat":
        return BatWeights(block)
    return MissWeights(block, info.in_features, info.out_features)


def _check_base_copy(info: ModuleInfo, saved: torch.Tensor) -> None:
    """PEFT saves the embedding's own weight when it is targeted; only an identical copy is accepted."""
    assert info.weight is not None
    if not torch.equal(saved.to(info.weight.dtype), info.weight.detach().cpu()):
        raise AdapterError(f"{info.name}.base_layer.weight differs from the base model's weight: adapters may "
                           "not replace base weights")
