"""Put adapter-aware wrappers into a transformers model and keep a registry of them.

Every `nn.Linear` (decoder projections and `lm_head`) and the input
`nn.Embedding` are wrapped in place; names are the base model's own
(`model.layers.0.self_attn.q_proj`), i.e. PEFT's keys minus `base_model.model.`.
Wrapping is idempotent and leaves the base weights frozen and uncopied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from server.adapters.runtime.backend import AdapterBackend, CpuKernelBackend, TorchBackend
from server.adapters.runtime.layers import AdaptedEmbedding, AdaptedLinear, AdaptedModule
from server.adapters.runtime.module_copies import ModuleCopyPool, pool_rows
from server.adapters.weights.loaded import LoadedAdapter
from server.adapters.runtime.slots import SlotBank
from server.adapters.runtime.transfer import Fence, InlineCopier, SlotCopier, copier_for
from server.adapters.limits import AdapterLimits
from server.kernels.cpu import load_kernel
from server.model.quantize import weight_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    kind: str  # linear | embedding | other
    in_features: int  # embedding: num_embeddings
    out_features: int  # embedding: embedding_dim
    weight: torch.Tensor | None


def module_table(model: nn.Module) -> dict[str, ModuleInfo]:
    """The base model's modules by PEFT name, seen through our wrappers (injected or not)."""
    table: dict[str, ModuleInfo] = {}
    wrapped: set[str] = set()
    for name, mod in model.named_modules():
        if wrapped and _inside_wrapper(name, wrapped):
            continue
        if isinstance(mod, AdaptedModule):
            wrapped.add(name)
            mod = mod.base_layer
        table[name] = _info(name, mod)
    return table


def _inside_wrapper(name: str, wrapped: set[str]) -> bool:
    """`name` is below a wrapper (its base layer, or a trainer's module attached to it): the
    wrapper stands for the base module, nothing beneath it is a module of the base model."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in wrapped for i in range(1, len(parts)))


def _info(name: str, mod: nn.Module) -> ModuleInfo:
    if isinstance(mod, nn.Linear):
        return ModuleInfo(name, "linear", mod.in_features, mod.out_features, mod.weight)
    if isinstance(mod, nn.Embedding):
        return ModuleInfo(name, "embedding", mod.num_embeddings, mod.embedding_dim, mod.weight)
    return ModuleInfo(name, "other", 0, 0, None)


def all_linear_names(model: nn.Module, table: dict[str, ModuleInfo]) -> set[str]:
    """PEFT's `all-linear`: every Linear except the output embedding (lm_head)."""
    names = {n for n, info in table.items() if info.kind == "linear"}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        names -= {n for n, m in model.named_modules() if m is out}
    return names


class AdapterLayers:
    """Registry of injected wrappers; writes/clears whole adapters into device slots."""

    def __init__(self, layers: dict[str, AdaptedModule], num_slots: int,
                 copier: SlotCopier | None = None, copies: ModuleCopyPool | None = None) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.copier = copier or InlineCopier()
        self.copies = copies  # whole-module copies (modules_to_save); None: the model has no pool
        self._slot_modules: list[set[str]] = [set() for _ in range(num_slots)]

    def __getitem__(self, name: str) -> AdaptedModule:
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def load_slot(self, slot: int, adapter: LoadedAdapter, copy_rows: Sequence[int] = ()) -> Fence:
        """Copy an adapter into `slot` of every module it targets (engine thread, between steps), replacing
        what the slot held: modules both target are overwritten in place, the old adapter's others cleared.
        Its whole-module copies (modules_to_save) go to `copy_rows` of the copy pool, one per distinct copy.
        The copies may still be running when this returns: no step may read the slot before the fence is
        done (`Fence.done`, then `order_before_compute`; on CPU it is done at once)."""
        missing = [n for n in adapter.modules if n not in self.layers]
        if missing:
            raise KeyError(f"adapter targets modules that were not injected: {missing[:3]}")
        if adapter.saved and self.copies is None:
            raise KeyError(f"adapter saves whole modules {adapter.saved.names()} but this model has no copy pool")
        old = self._slot_modules[slot]
        try:
            self._grow_for(adapter)
            if adapter.saved and self.copies is not None and self.copies.table is None:
                self.copier.join()
                self.copies.allocate()
            with self.copier.writes() as stage:
                for name in old.difference(adapter.modules):
                    self.layers[name].bank.clear(slot)
                for name, weights in adapter.modules.items():
                    self.layers[name].bank.write(slot, weights, stage)
                if self.copies is not None:
                    self.copies.clear(slot)
                    if adapter.saved:
                        self.copies.write(slot, copy_rows, adapter.saved, stage)
        except BaseException:
            self._slot_modules[slot] = old | set(adapter.modules)
            self.clear_slot(slot)  # never half of one adapter and half of another
            raise
        self._slot_modules[slot] = set(adapter.modules)
        return self.copier.fence()

    def _grow_for(self, adapter: LoadedAdapter) -> None:
        """Grow the banks this adapter outranks on the compute stream, after every write in flight
        (they may target the tensors being replaced), so the writes themselves never allocate."""
        grow = [(bank, rank) for bank, rank in self._slotted(adapter) if rank > bank.r_cap]
        if grow:
            self.copier.join()
            for bank, rank in grow:
                bank.grow(rank)

    def needs_growth(self, adapter: LoadedAdapter) -> bool:
        return any(bank.needs(rank) for bank, rank in self._slotted(adapter))

    def reserve(self, adapter: LoadedAdapter) -> None:
        """Any thread: allocate the larger slot tensors `load_slot(…, adapter)` will need (SlotBank.reserve)."""
        for bank, rank in self._slotted(adapter):
            bank.reserve(rank)

    def _slotted(self, adapter: LoadedAdapter) -> Iterator[tuple[SlotBank, int]]:
        """(bank, rank) of each module whose factors the adapter puts in slot rows (not bat blocks)."""
        for name, weights in adapter.modules.items():
            if weights.batched and name in self.layers:
                yield self.layers[name].bank, weights.rank

    def clear_slot(self, slot: int) -> None:
        with self.copier.writes():  # ordered with the slot's writes, after the steps that read it
            for name in self._slot_modules[slot]:
                self.layers[name].bank.clear(slot)
            if self.copies is not None:
                self.copies.clear(slot)
        self._slot_modules[slot] = set()

    def set_train_adapters(self, modules: dict[str, nn.Module] | None) -> None:
        """Trainer hook: attach (or with None detach) trainable modules by module name."""
        for name, layer in self.layers.items():
            layer.train_adapter = None if modules is None else modules.get(name)

    def slot_bytes(self) -> int:
        """Device bytes of the slot banks and of the module-copy pool."""
        copies = 0 if self.copies is None else self.copies.nbytes()
        return sum(layer.bank.nbytes() for layer in self.layers.values()) + copies


def inject_adapter_layers(model: nn.Module, limits: AdapterLimits, *, copier: SlotCopier | None = None,
                          backend: AdapterBackend | None = None) -> AdapterLayers:
    """Wrap the model's modules. `copier`: how slot writes reach the device; None = by the model's device
    (transfer.copier_for). `backend`: None = the one `adapter_backend` picks for this model."""
    existing = getattr(model, "_loraplex_layers", None)
    if existing is not None:
        return existing
    slots = limits.max_adapters_resident
    targets: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    ]
    embed = model.get_input_embeddings()
    targets += [(n, m) for n, m in model.named_modules() if m is embed and isinstance(m, nn.Embedding)]
    slot_dtype = slot_dtype_for(model, limits)
    backend = backend or adapter_backend(model, limits, slot_dtype)
    layers: dict[str, AdaptedModule] = {}
    for name, mod in targets:
        layers[name] = _wrap(model, name, mod, slots, limits.max_rank, slot_dtype, backend)
    copies = _copy_pool(model, layers, slots, limits)
    registry = AdapterLayers(layers, slots, copier or copier_for(next(model.parameters()).device), copies)
    model._loraplex_layers = registry  # type: ignore[assignment]
    return registry


def copy_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules an adapter may replace whole (modules_to_save), by name, injected or not: the input
    embedding when it is a plain lookup (Gemma 3's rescales its rows: not a gather of the copy), and the
    head when it has no bias and, beside such an embedding, its shape (the two then share one pool)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    e, h = _unwrapped(embed), _unwrapped(head)
    lookup = isinstance(e, nn.Embedding) and type(e).forward is nn.Embedding.forward
    shape = e.weight.shape if lookup else h.weight.shape if isinstance(h, nn.Linear) else None
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if mod is embed and lookup:
            found[name] = mod
        elif mod is head and isinstance(h, nn.Linear) and h.bias is None and h.weight.shape == shape:
            found[name] = mod
    return found


def _unwrapped(mod: nn.Module | None) -> nn.Module | None:
    return mod.base_layer if isinstance(mod, AdaptedModule) else mod


def copy_pool_rows(model: nn.Module, limits: AdapterLimits, slots: int) -> int:
    """How many whole-module copies the `module_copy_budget` holds on this model (0: none)."""
    modules = list(copy_modules(model).values())
    if not modules:
        return 0
    weight = modules[0].weight
    return pool_rows(limits.module_copy_budget, weight.numel() * weight.element_size(), slots)


def _copy_pool(model: nn.Module, layers: dict[str, AdaptedModule], slots: int,
               limits: AdapterLimits) -> ModuleCopyPool | None:
    names = [n for n in copy_modules(model) if n in layers]
    if not names:
        return None
    weight = layers[names[0]].weight
    pool = ModuleCopyPool(copy_pool_rows(model, limits, slots), (int(weight.shape[0]), int(weight.shape[1])),
                          slots, weight.device, weight.dtype, names)
    for name in names:
        layers[name].copies = pool
    log.info("module-copy pool (modules_to_save of %s): %d copies of %dx%d, %.1f MiB each, %.1f MiB in all "
             "(module_copy_budget_mb %d), allocated at the first adapter that brings one", ", ".join(names),
             pool.rows, *pool.shape, pool.row_bytes / (1 << 20), pool.rows * pool.row_bytes / (1 << 20),
             limits.module_copy_budget >> 20)
    return pool


def slot_dtype_for(model: nn.Module, limits: AdapterLimits) -> torch.dtype:
    """The dtype adapter factors are held in on the device: limits.slot_dtype, None = the model's."""
    return next(model.parameters()).dtype if limits.slot_dtype is None else limits.slot_dtype


def adapter_backend(model: nn.Module, limits: AdapterLimits, slot_dtype: torch.dtype) -> AdapterBackend:
    """Chosen once for every layer: the Triton kernels for a model on CUDA where Triton imports; the C
    kernel for a float32 model on CPU when the configuration allows it and it was built for the slots'
    dtype; torch's GEMMs otherwise."""
    weight = next(model.parameters())
    if weight.device.type == "cuda":
        return _cuda_backend()
    if not limits.cpu_kernels or limits.kernel_cache_dir is None:
        return TorchBackend()
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return TorchBackend()
    kernel = load_kernel(limits.kernel_cache_dir)
    if kernel is None:
        return TorchBackend()
    if slot_dtype not in kernel.weight_dtypes:
        log.warning("slot_dtype %s: this CPU's kernel has no such variant, decode takes the (slower) torch path",
                    slot_dtype)
        return TorchBackend()
    return CpuKernelBackend(kernel)


def _cuda_backend() -> AdapterBackend:
    """Imported here, not at the top: importing it imports Triton, which a CPU server never needs."""
    try:
        from server.adapters.runtime.triton_backend import TritonBackend
    except ImportError as e:
        log.warning("Triton does not import (%s): adapters on CUDA take the (slower) torch path", e)
        return TorchBackend()
    return TritonBackend()


def _wrap(model: nn.Module, name: str, mod: nn.Module, slots: int, max_rank: int,
          slot_dtype: torch.dtype, backend: AdapterBackend) -> AdaptedModule:
    weight = mod.weight
    if isinstance(mod, nn.Embedding):
        bank = SlotBank(slots, mod.num_embeddings, mod.embedding_dim, max_rank, weight.device, weight.dtype,
                        embedding=True, slot_dtype=slot_dtype)
        wrapper: AdaptedModule = AdaptedEmbedding(mod, name, bank, backend)
    else:
        bank = SlotBank(slots, mod.in_features, mod.out_features, max_rank, weight.device, weight_dtype(weight),
                        slot_dtype=slot_dtype)
        wrapper = AdaptedLinear(mod, name, bank, backend)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, wrapper)
    return wrapper
