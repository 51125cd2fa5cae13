"""One job's training on the shared frozen base: micro-steps, schedule, checkpoints, output.

No copy of the base: the trainable modules are hung on the adapter-aware
wrappers as `train_adapter` for the duration of a micro-step and the forward
runs under a mapping whose every token is TRAIN_SLOT, so only those tokens
(all of them, here) get the trainable delta. Base parameters keep
requires_grad=False; autograd only reaches the adapter parameters.

Reproducibility: initial weights come from the seed, batch k's examples from
(seed, k) and dropout masks from a generator re-seeded per micro-step, so a job
resumed from a checkpoint continues exactly as an uninterrupted run would —
no RNG state has to be saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from server.adapters.runtime.mapping import TRAIN_SLOT, AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.training.data import IGNORE_INDEX, Batch, BatchOrder, TokenizedExample, collate
from server.training.export import load_peft_state_dict, load_tensors, peft_state_dict, save_peft
from server.training.modules import TrainableAdapter, base_of, build_adapters, is_wrapper
from server.training.spec import TrainingJobSpec

CKPT_WEIGHTS = "adapter.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "state.json"
LATEST = "latest.json"


@dataclass(frozen=True)
class StepResult:
    step: int  # optimizer steps done, 1-based after the first
    loss: float  # mean loss per completion token over the step's examples
    lr: float
    grad_norm: float


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_mapping(num_tokens: int, device: torch.device) -> AdapterMapping:
    return AdapterMapping.from_token_slots([TRAIN_SLOT] * num_tokens, device)


def plain_head(config: object) -> bool:
    """logits == lm_head(hidden) for this architecture (no soft-capping or logit scaling)."""
    return all(getattr(config, name, None) in (None, 1.0) for name in
               ("final_logit_softcapping", "logit_scale", "logits_scaling"))


@contextlib.contextmanager
def attached(model: nn.Module, adapters: Mapping[str, TrainableAdapter]) -> Iterator[None]:
    """Hang the trainable modules on their layers for one forward/backward.

    Wrappers take them as `train_adapter` (applied to TRAIN_SLOT tokens only);
    a base model without wrappers (standalone use) gets forward hooks instead.
    """
    modules = dict(model.named_modules())
    hooks = []
    try:
        for path, adapter in adapters.items():
            layer = modules[path]
            if is_wrapper(layer):
                layer.train_adapter = adapter
            else:
                hooks.append(layer.register_forward_hook(
                    lambda mod, args, out, a=adapter: out + a(args[0])))
        yield
    finally:
        for path in adapters:
            if is_wrapper(modules[path]):
                modules[path].train_adapter = None
        for hook in hooks:
            hook.remove()


class Trainer:
    def __init__(self, model: nn.Module, spec: TrainingJobSpec, examples: list[TokenizedExample],
                 pad_id: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.spec = spec
        self.examples = examples
        self.pad_id = pad_id
        self.device = device
        self.adapters = build_adapters(model, spec, device, dtype)
        self.params = [p for m in self.adapters.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
        self.order = BatchOrder(len(examples), spec.batch_size, spec.seed)
        self.dropout_gen = torch.Generator(device=device)
        for m in self.adapters.values():
            m.generator = self.dropout_gen
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches done within the current step
        self._loss_sum = 0.0
        self._targets = 0

    @property
    def done(self) -> bool:
        return self.step >= self.spec.steps

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------- stepping
    def _micro_index(self) -> int:
        return self.step * self.spec.grad_accum + self.micro

    def _step_targets(self) -> int:
        """Loss-carrying tokens in the whole optimizer step (the loss is their mean)."""
        first = self.step * self.spec.grad_accum
        return sum(self.examples[i].num_targets for k in range(first, first + self.spec.grad_accum)
                   for i in self.order.indices(k))

    def micro_step(self) -> StepResult | None:
        """One forward+backward on one micro-batch; returns the result when it completes a step."""
        if self.done:
            raise RuntimeError("training already finished")
        if self.micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._loss_sum, self._targets = 0.0, self._step_targets()
        batch = collate([self.examples[i] for i in self.order.indices(self._micro_index())], self.pad_id,
                        self.device)
        self.dropout_gen.manual_seed(self.spec.seed * 7_919 + self._micro_index())
        loss_sum = self._forward_loss(batch)
        (loss_sum / max(1, self._targets)).backward()
        self._loss_sum += float(loss_sum.detach())
        self.micro += 1
        if self.micro < self.spec.grad_accum:
            return None
        return self._optimizer_step()

    def train_step(self) -> StepResult:
        """A whole optimizer step (all its micro-batches): for scripts and tests."""
        while True:
            result = self.micro_step()
            if result is not None:
                return result

    def _optimizer_step(self) -> StepResult:
        lr = self.spec.learning_rate * lr_factor(self.step, self.spec.steps, self.spec.warmup_steps,
                                                 self.spec.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.spec.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params
                                                               if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.micro = 0
        return StepResult(self.step, self._loss_sum / max(1, self._targets), lr, norm)

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the batch's completion tokens."""
        # Position p predicts token p+1: only positions whose next token carries loss need logits.
        wanted = (batch.labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()  # [k]
        for m in self.adapters.values():
            m.train()
        with torch.enable_grad(), attached(self.model, self.adapters):
            logits = self._logits(batch, wanted)  # [b, k, V]
        targets = batch.labels[:, wanted + 1]  # [b, k]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def _logits(self, batch: Batch, wanted: torch.Tensor) -> torch.Tensor:
        """Logits at `wanted` positions only (the vocab projection is a large share of a small model).

        A plain head takes `logits_to_keep`; a wrapped head (the adapter layers
        wrap lm_head too) reads the mapping, so it is called separately on the
        kept rows under a mapping of that many tokens.
        """
        b, width = batch.input_ids.shape
        head = self.model.get_output_embeddings()
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        with adapter_step(train_mapping(b * width, self.device)):
            if head is None or not is_wrapper(head):
                return self.model(**kwargs, logits_to_keep=wanted).logits
            if not plain_head(self.model.config):
                return self.model(**kwargs).logits[:, wanted]
            hidden = self.model.get_decoder()(**kwargs).last_hidden_state[:, wanted]  # [b, k, H]
        with adapter_step(train_mapping(hidden.shape[0] * hidden.shape[1], self.device)):
            return head(hidden)  # [b, k, V]

    # ---------------------------------------------------------- persistence
    def save_checkpoint(self, root: Path) -> None:
        """Write step-N/ fully, then point latest.json at it (atomic rename), then drop older ones."""
        assert self.micro == 0, "checkpoints are taken between optimizer steps"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:08d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        from safetensors.torch import save_file

        save_file(peft_state_dict(self.adapters), str(tmp / CKPT_WEIGHTS))
        torch.save(self.optimizer.state_dict(), tmp / CKPT_OPTIMIZER)
        (tmp / CKPT_STATE).write_text(json.dumps({"step": self.step}))
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(json.dumps({"dir": name, "step": self.step}))
        os.replace(pointer, root / LATEST)
        for old in root.iterdir():
            if old.name.startswith("step-") and old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, root: Path) -> bool:
        """Resume from the latest complete checkpoint under `root`; False if there is none."""
        try:
            latest = json.loads((root / LATEST).read_text())
        except (OSError, ValueError):
            return False
        ckpt = root / str(latest["dir"])
        load_peft_state_dict(self.adapters, load_tensors(ckpt / CKPT_WEIGHTS))
        state = torch.load(ckpt / CKPT_OPTIMIZER, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)
        self.step = int(json.loads((ckpt / CKPT_STATE).read_text())["step"])
        self.micro = 0
        return True

    def save_output(self, directory: Path, base_model_id: str | None) -> None:
        save_peft(directory, self.adapters, self.spec, base_model_id)

    def base_storages(self) -> dict[str, int]:
        """Targeted layers' base weight storage pointers (tests: the base is shared, never copied)."""
        modules = dict(self.model.named_modules())
        return {p: base_of(modules[p]).weight.untyped_storage().data_ptr() for p in self.adapters}
