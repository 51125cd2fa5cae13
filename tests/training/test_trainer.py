"""The trainer on the served (wrapper-injected) tiny base: learning, reproducibility, the shared base."""

from __future__ import annotations

import torch

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.peft.peft_format import read_adapter
from server.training.trainer import Trainer, lr_factor
from tests.harness import TRAIN_DATA
from tests.training.conftest import ALL_LINEAR, greedy, make_spec, make_trainer


def test_loss_falls_and_adapter_reproduces_target_greedily(tiny_served, train_settings, tmp_path):
    data = TRAIN_DATA
    # lm_head too: the tiny model's EOS row is its (zero) padding embedding, tied to the head, so
    # only an adapted head can learn to stop. It also covers the trainer's wrapped-head path.
    spec = make_spec(data=data, target_modules=[*ALL_LINEAR, "lm_head"], steps=60, learning_rate=1e-2,
                     batch_size=2, warmup_steps=3)
    trainer = make_trainer(tiny_served, spec)
    losses = [trainer.train_step().loss for _ in range(spec.steps)]
    assert losses[-1] < 0.01 * losses[0], losses[::10]
    trainer.save_output(tmp_path / "out", "tiny")

    # Serve it the way the server does: validated by the reader, copied into a device slot.
    layers = inject_adapter_layers(tiny_served.model, AdapterLimits.from_settings(train_settings))
    layers.load_slot(1, read_adapter(tmp_path / "out", tiny_served, AdapterLimits.from_settings(train_settings)))
    try:
        tok = tiny_served.tokenizer
        for ex in data:
            prompt = tok(ex["prompt"])["input_ids"]
            target = tok(ex["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert greedy(tiny_served, prompt, len(target) + 2, slot=1) == target
            # The base alone does not say it: the adapter made the difference.
            assert greedy(tiny_served, prompt, len(target), slot=-1) != target
    finally:
        layers.clear_slot(1)


def test_base_weights_unchanged_and_never_copied(tiny_served):
    model = tiny_served.model
    before = {n: (p.detach().clone(), p.untyped_storage().data_ptr()) for n, p in model.named_parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for spec in (make_spec(target_modules=["embed_tokens", *ALL_LINEAR], dropout=0.1),
                 make_spec(method="miss", variant="bat", rank=8, target_modules=["q_proj", "o_proj"])):
        trainer = make_trainer(tiny_served, spec)
        for _ in range(3):
            trainer.train_step()
        # The trainer's modules reference the served weights, they do not own copies.
        for path, ptr in trainer.base_storages().items():
            assert ptr in storages, path
        for m in trainer.adapters.values():
            own = {t.untyped_storage().data_ptr() for t in m.state_dict().values()}
            assert not own & storages
    for n, p in model.named_parameters():
        clone, ptr = before[n]
        assert torch.equal(p, clone), n  # bit-for-bit
        assert p.untyped_storage().data_ptr() == ptr, n  # same storage: not replaced
        assert not p.requires_grad and p.grad is None, n
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == param_bytes
    # Nothing stays attached once a step is over.
    assert all(getattr(m, "train_adapter", None) is None for m in model.modules())


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_served, tmp_path):
    spec = make_spec(target_modules=["q_proj", "v_proj"], dropout=0.2, steps=6, grad_accum=2, batch_size=1)
    straight = make_trainer(tiny_served, spec)
    losses = [straight.train_step().loss for _ in range(6)]

    first = make_trainer(tiny_served, spec)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = make_trainer(tiny_served, spec)
    assert resumed.load_checkpoint(tmp_path / "ckpt") and resumed.step == 3
    resumed_losses = [resumed.train_step().loss for _ in range(3)]
    assert resumed_losses == losses[3:]
    for (k, a), (k2, b) in zip(straight.adapters.items(), resumed.adapters.items(), strict=True):
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), (k, n)


def test_same_seed_same_adapter_different_seed_differs(tiny_served):
    def run(seed: int) -> torch.Tensor:
        t = make_trainer(tiny_served, make_spec(seed=seed, steps=3, dropout=0.1))
        for _ in range(3):
            t.train_step()
        return torch.cat([p.detach().flatten() for p in t.params])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_grad_accum_matches_one_big_batch(tiny_served):
    """Loss is the mean over the step's completion tokens however the step is split."""
    data = [{"prompt": f"Q{i}:", "completion": " answer" * (i + 1)} for i in range(4)]
    big = make_trainer(tiny_served, make_spec(data=data, batch_size=4, grad_accum=1, steps=2))
    small = make_trainer(tiny_served, make_spec(data=data, batch_size=2, grad_accum=2, steps=2))
    for _ in range(2):
        a, b = big.train_step(), small.train_step()
        assert abs(a.loss - b.loss) < 1e-5 and abs(a.grad_norm - b.grad_norm) < 1e-4
    for x, y in zip(big.params, small.params, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_schedules():
    assert lr_factor(0, 10, 2, "cosine") == 0.5 and lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and 0 < lr_factor(9, 10, 2, "cosine") < 0.05
    assert lr_factor(6, 10, 2, "linear") == 0.5
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_trainer_without_wrappers_uses_hooks(tiny_model_dir, train_settings):
    """Standalone use on a plain model (no injected layers) trains the same modules."""
    from server.model.load import load_base

    plain = load_base(train_settings)
    trainer = make_trainer(plain, make_spec(steps=5))
    assert isinstance(trainer, Trainer)
    losses = [trainer.train_step().loss for _ in range(5)]
    assert losses[-1] < losses[0]
    assert not any(m._forward_hooks for m in plain.model.modules())
