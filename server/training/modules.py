"""The trainable adapter modules: LoRA (Linear, Embedding), DoRA (Linear) and MiSS (balance, mini, bat).

Each module computes only the *delta* an adapter adds to its base layer's
output, `train_adapter(x) -> Δy`, which the adapter-aware wrappers add for the
tokens of the training slot. Parameter names are PEFT's own suffixes
(`lora_A.weight`, `lora_embedding_A`, `miss_block`, ...) so a module's
`state_dict()` becomes an `adapter_model.safetensors` key by prefixing
`base_model.model.<module path>.` — no renaming table to drift out of date.
Parameters are float32 whatever the base dtype (optimizer stability); inputs
are cast up and results cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from server.adapters.weights.miss import bat_delta
from server.errors import InvalidRequest
from server.model.quantize import dense_weight, weight_shape
from server.training.spec import TrainingJobSpec

PARAM_DTYPE = torch.float32


def _dropout(x: torch.Tensor, p: float, gen: torch.Generator | None, training: bool) -> torch.Tensor:
    """Inverted dropout drawing from the trainer's own generator (reproducible, leaves the global RNG alone)."""
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen)
    return x * keep / (1.0 - p)


class TrainableAdapter(nn.Module):
    """Common plumbing: the trainer sets `generator` (dropout) once it knows its device."""

    generator: torch.Generator | None = None


class LoraLinear(TrainableAdapter):
    """Δy = dropout(x) Aᵀ Bᵀ · s   (PEFT init: A kaiming-uniform, B zero)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 device: torch.device, init_gen: torch.Generator) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=PARAM_DTYPE)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=PARAM_DTYPE)
        self.scaling = scaling
        self.p = dropout
        a = torch.empty(r, in_features, dtype=PARAM_DTYPE)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=init_gen)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        h = _dropout(x.to(PARAM_DTYPE), self.p, self.generator, self.training)
        return (self.lora_B(self.lora_A(h)) * self.scaling).to(x.dtype)


class LoraEmbedding(TrainableAdapter):
    """Δy = emb(ids, Aᵀ) Bᵀ · s   (PEFT init: A zero, B normal; no dropout on ids)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scaling: float,
                 device: torch.device, init_gen: torch.Generator, out_dtype: torch.dtype) -> None:
        super().__init__()
        b = torch.randn(embedding_dim, r, generator=init_gen, dtype=PARAM_DTYPE)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, device=device, dtype=PARAM_DTYPE))
        self.lora_embedding_B = nn.Parameter(b.to(device))
        self.scaling = scaling
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [...] -> [..., dim]
        after_a = F.embedding(ids, self.lora_embedding_A.T)  # [..., r]
        return (after_a @ self.lora_embedding_B.T * self.scaling).to(self.out_dtype)


class DoraLinear(LoraLinear):
    """PEFT's DoRA: Δy = (g − 1)·(h Wᵀ) + g·(h Aᵀ Bᵀ · s), g = m / ‖W + s·BA‖_col with the norm detached
    (DoRA paper §4.3), h = dropout(x); m starts at ‖W‖ (B is zero), PEFT's init.

    The frozen base weight is referenced, never copied nor saved; the rescale of the base output costs one
    extra full matmul per step (the wrapper hands a trainable module x alone). A quantized base weight is
    dequantized for that matmul and the norm each step (no dense copy is kept)."""

    def __init__(self, base_weight: torch.Tensor, r: int, scaling: float, dropout: float,
                 device: torch.device, init_gen: torch.Generator) -> None:
        out_features, in_features = weight_shape(base_weight)
        super().__init__(in_features, out_features, r, scaling, dropout, device, init_gen)
        self._base = (base_weight,)  # a tuple: not registered, not in state_dict
        self.lora_magnitude_vector = nn.Parameter(self._norm().to(device))  # [out]

    def _norm(self) -> torch.Tensor:
        """‖W + s·BA‖ per output row `[out]`, float32, detached."""
        with torch.no_grad():
            w = dense_weight(self._base[0]).to(PARAM_DTYPE)
            return torch.linalg.norm(w + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        h = _dropout(x.to(PARAM_DTYPE), self.p, self.generator, self.training)
        g = self.lora_magnitude_vector / self._norm()  # [out]
        base = F.linear(h, dense_weight(self._base[0]).to(PARAM_DTYPE))  # [..., out], no bias: DoRA leaves it out
        return ((g - 1) * base + g * self.lora_B(self.lora_A(h)) * self.scaling).to(x.dtype)


class MissLinear(TrainableAdapter):
    """MiSS balance/mini: Δy = fold_r(pad(dropout(x))) @ block, block zero-initialised (PEFT's init).

    `fold_r` sums the input in chunks of r (a reshape + sum, no matmul); mini
    stores a [r, mini_r] block repeated along out_features.
    """

    def __init__(self, in_features: int, out_features: int, r: int, dropout: float, device: torch.device,
                 mini_r: int | None = None) -> None:
        super().__init__()
        width = mini_r if mini_r is not None else out_features
        self.miss_block = nn.Parameter(torch.zeros(r, width, device=device, dtype=PARAM_DTYPE))
        self.r = r
        self.repeats = out_features // width
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        h = x.to(PARAM_DTYPE)
        pad = (self.r - h.shape[-1] % self.r) % self.r
        if pad:
            h = F.pad(h, (0, pad))
        h = _dropout(h, self.p, self.generator, self.training)
        folded = h.reshape(*h.shape[:-1], h.shape[-1] // self.r, self.r).sum(dim=-2)  # [..., r]
        block = self.miss_block.repeat(1, self.repeats) if self.repeats > 1 else self.miss_block  # [r, out]
        return (folded @ block).to(x.dtype)


class MissBat(TrainableAdapter):
    """MiSS bat: ΔW = W_blk·B + B per r×r block of the frozen weight W (PEFT's get_delta_weight).

    Δy = x ΔWᵀ needs the base weight, which is referenced (never copied, never
    a parameter of this module); its cost is one extra full matmul per step.
    """

    def __init__(self, base_weight: torch.Tensor, r: int) -> None:
        super().__init__()
        out_features, in_features = weight_shape(base_weight)
        self.miss_block = nn.Parameter(
            torch.zeros(out_features // r, r, r, device=base_weight.device, dtype=PARAM_DTYPE))
        self.r = r
        self._base = (base_weight,)  # a tuple: not registered, not in state_dict

    def delta_weight(self) -> torch.Tensor:  # [out, in]
        weight = dense_weight(self._base[0])  # a quantized base: dequantized per step, never kept
        return bat_delta(weight, self.miss_block, PARAM_DTYPE)  # the serving path's formula, autograd-safe

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        return F.linear(x.to(PARAM_DTYPE), self.delta_weight()).to(x.dtype)


# --------------------------------------------------------------------- build
def base_of(module: nn.Module) -> nn.Module:
    """The plain layer: an adapter-aware wrapper keeps it at `.base_layer`."""
    return getattr(module, "base_layer", module)


def is_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "train_adapter") and hasattr(module, "base_layer")


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules a job may target: the adapter-aware wrappers if the model has them, else plain layers."""
    named = list(model.named_modules())
    wrapped = {name: m for name, m in named if is_wrapper(m)}
    if wrapped:
        return wrapped
    return {name: m for name, m in named
            if isinstance(m, (nn.Linear, nn.Embedding)) and not name.endswith(".base_layer")}


def matches(name: str, target: str) -> bool:
    """PEFT's list rule: the full module name, or its suffix after a dot."""
    return name == target or name.endswith("." + target)


def select_targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    candidates = candidate_modules(model)
    selected: dict[str, nn.Module] = {}
    for target in targets:
        hits = {name: m for name, m in candidates.items() if matches(name, target)}
        if not hits:
            known = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            raise InvalidRequest(f"unknown target module {target!r}; this base model has {known}")
        selected.update(hits)
    return dict(sorted(selected.items()))


def lora_scaling(spec: TrainingJobSpec) -> float:
    return spec.lora_alpha / (math.sqrt(spec.rank) if spec.use_rslora else spec.rank)


def check_layer(name: str, layer: nn.Module, spec: TrainingJobSpec) -> None:
    """Whether `spec` can adapt this layer; the message names the reason (checked at submission)."""
    base = base_of(layer)
    r = spec.rank
    if isinstance(base, nn.Embedding):
        if spec.method == "dora":
            raise InvalidRequest(f"DoRA trains Linear modules only; {name!r} is an Embedding (use method 'lora')")
        if spec.method != "lora":
            raise InvalidRequest(f"MiSS cannot target the embedding {name!r}; use LoRA or Linear targets")
        return
    if not isinstance(base, nn.Linear):
        raise InvalidRequest(f"module {name!r} is not a Linear or Embedding layer")
    if spec.method == "dora" and bool((dense_weight(base.weight) == 0).all(dim=1).any()):
        raise InvalidRequest(f"DoRA cannot adapt {name!r}: its weight has an all-zero output row (a padding "
                             "embedding tied to it, say), where DoRA's column norm starts at zero and its "
                             "rescale is 0/0")
    if spec.method in ("lora", "dora"):
        return
    in_f, out_f = base.in_features, base.out_features
    if r > in_f:
        raise InvalidRequest(f"MiSS rank {r} exceeds in_features {in_f} of {name!r}")
    if spec.variant == "bat" and (in_f % r or out_f % r):
        raise InvalidRequest(f"MiSS bat needs {name!r} ({out_f}x{in_f}) divisible into {r}x{r} blocks")
    if spec.variant == "mini" and out_f % (spec.mini_r or 1):
        raise InvalidRequest(f"MiSS mini_r {spec.mini_r} does not divide out_features {out_f} of {name!r}")


def plan_targets(model: nn.Module, spec: TrainingJobSpec) -> dict[str, nn.Module]:
    """The layers a job adapts, every one checked: the submission-time validation."""
    selected = select_targets(model, spec.target_modules)
    for name, layer in selected.items():
        check_layer(name, layer, spec)
    return selected


def build_one(layer: nn.Module, spec: TrainingJobSpec, device: torch.device, init_gen: torch.Generator,
              out_dtype: torch.dtype) -> TrainableAdapter:
    base = base_of(layer)
    r = spec.rank
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base.num_embeddings, base.embedding_dim, r, lora_scaling(spec), device, init_gen,
                             out_dtype)
    in_f, out_f = base.in_features, base.out_features
    if spec.method == "lora":
        return LoraLinear(in_f, out_f, r, lora_scaling(spec), spec.dropout, device, init_gen)
    if spec.method == "dora":
        return DoraLinear(base.weight, r, lora_scaling(spec), spec.dropout, device, init_gen)
    if spec.variant == "bat":
        return MissBat(base.weight, r)
    return MissLinear(in_f, out_f, r, spec.dropout, device, mini_r=spec.mini_r if spec.variant == "mini" else None)


def build_adapters(model: nn.Module, spec: TrainingJobSpec, device: torch.device,
                   out_dtype: torch.dtype) -> dict[str, TrainableAdapter]:
    """One trainable module per targeted layer, initialised from the job's seed (PEFT's inits)."""
    init_gen = torch.Generator().manual_seed(spec.seed)
    return {name: build_one(layer, spec, device, init_gen, out_dtype)
            for name, layer in plan_targets(model, spec).items()}
