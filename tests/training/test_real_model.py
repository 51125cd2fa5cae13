"""The real embedded default model (SmolLM2-135M-Instruct): a few examples → the adapter says them."""

from __future__ import annotations

import pytest

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.peft.peft_format import read_adapter
from server.model.load import load_base
from tests.harness import cpu_settings
from tests.training.conftest import greedy, make_spec, make_trainer


@pytest.mark.slow
def test_real_model_learns_a_target_completion(embedded_model_dir, tmp_path):
    settings = cpu_settings(embedded_model_dir, tmp_path / "store")
    base = load_base(settings)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    before = {n: p.untyped_storage().data_ptr() for n, p in base.model.named_parameters()}
    data = [{"prompt": "The secret word is", "completion": " pineapple"},
            {"prompt": "Captain's greeting:", "completion": " Ahoy matey!"}]
    spec = make_spec(data=data, target_modules=["q_proj", "v_proj", "o_proj"], steps=10, learning_rate=5e-3,
                     batch_size=2, warmup_steps=2)
    trainer = make_trainer(base, spec)
    losses = [trainer.train_step().loss for _ in range(spec.steps)]
    assert losses[-1] < 0.2 * losses[0], losses
    trainer.save_output(tmp_path / "out", base.model_id)
    layers.load_slot(0, read_adapter(tmp_path / "out", base, AdapterLimits.from_settings(settings)))
    tok = base.tokenizer
    for ex in data:
        prompt = tok(ex["prompt"])["input_ids"]
        target = tok(ex["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert greedy(base, prompt, len(target), slot=0) == target
        assert greedy(base, prompt, len(target), slot=-1) != target
    assert {n: p.untyped_storage().data_ptr() for n, p in base.model.named_parameters()} == before
    assert not any(p.requires_grad for p in base.model.parameters())
