"""bfloat16 / float16 models on CPU: the served logits against PEFT's at the same dtype.

Half precision cannot be token-exact against PEFT (a different order of the
same roundings flips near-ties), so the contract is a tolerance: every logit
of a base row and of a LoRA row within HALF_TOLERANCE of PEFT's at the same
dtype, measured in units of the float32 logits' spread (measured: bfloat16
0.02-0.04, float16 0.002-0.006), after a prompt that crosses the sliding
window, a soft-capped layer included (Gemma 2); and no further from the
float32 logits than PEFT's own half-precision run is.
"""

from __future__ import annotations


import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.peft.peft_format import read_adapter
from server.engine.kv_cache import KVCache
from server.engine.runner import Runner
from server.engine.scheduler import StepPlan
from server.model.load import load_base
from server.settings import Settings
from tests.model import family_factory as ff
from tests.engine.fake_sequence import FakeSequence

# Max |ours - PEFT| over the vocabulary, as a fraction of the float32 logits' standard deviation.
HALF_TOLERANCE = {"bfloat16": 0.08, "float16": 0.01}


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("model_type", ["gemma2", "mistral"])
def test_half_precision_logits_within_tolerance_of_peft(tmp_path, embedded_model_dir, model_type, dtype):
    reference = ff.build_family(model_type)
    ff.save_family(model_type, tmp_path / "model", embedded_model_dir)
    peft32 = ff.make_adapter(reference, "lora", tmp_path / "lora", model_type, seed=3)
    settings = Settings(model=str(tmp_path / "model"), store=tmp_path / "store", device="cpu", dtype=dtype,
                        max_adapters_resident=1, max_rank=16)
    base = load_base(settings)
    assert next(base.model.parameters()).dtype == getattr(torch, dtype)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    layers.load_slot(0, read_adapter(tmp_path / "lora", base, AdapterLimits.from_settings(settings)))
    runner = Runner(base, KVCache.for_model(base.model.config, 2, 128, base.device, base.dtype))
    ids = torch.randint(3, ff.VOCAB, (4 * ff.WINDOW,), generator=torch.Generator().manual_seed(2)).tolist()
    seqs = [FakeSequence(ids, row=0, slot=-1), FakeSequence(ids, row=1, slot=0)]
    got = runner.forward(StepPlan(None, [], [(s, len(ids)) for s in seqs]))  # [2, vocab] float32

    half = getattr(torch, dtype)
    full = [_last_logits(reference, ids), _last_logits(peft32, ids)]
    spread = [f.std() for f in full]
    expected = [_last_logits(reference.to(half), ids), _last_logits(peft32.to(half), ids)]
    for row, (want, scale) in enumerate(zip(expected, spread)):
        err = float((got[row] - want).abs().max() / scale)
        assert err <= HALF_TOLERANCE[dtype], f"row {row}: max error {err:.4f} of the logits' spread"
        # and no further from the float32 logits than PEFT's own half-precision run (measured: 0.5-1.0x)
        ours, theirs = (float((x - full[row]).abs().max() / scale) for x in (got[row], want))
        assert ours <= 1.5 * theirs, f"row {row}: {ours:.4f} from float32 vs PEFT's {theirs:.4f}"
