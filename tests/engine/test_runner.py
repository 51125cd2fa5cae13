"""Runner: a step reads nothing back from the device (the sampled tokens are the engine's one read)."""

from __future__ import annotations

import pytest
import torch

from server.engine import kv_cache
from server.engine.runner import Runner, RunnerOptions
from server.engine.scheduler import StepPlan
from tests.engine.fake_sequence import FakeSequence

READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::tolist"}


@pytest.mark.parametrize("options", [RunnerOptions(), RunnerOptions(static_decode=True, buckets=(4, 8))],
                         ids=["eager", "static"])
def test_a_step_reads_nothing_back_from_the_device(varied_base, options):
    cache = kv_cache.KVCache.for_model(varied_base.model.config, 8, 64, varied_base.device, varied_base.dtype)
    runner = Runner(varied_base, cache, options)
    seqs = [FakeSequence(list(range(3, 3 + n)), row=i) for i, n in enumerate((5, 9, 7))]
    plans = [StepPlan(None, [], [(seqs[0], 5), (seqs[1], 4)]), StepPlan(None, [], [(seqs[1], 5), (seqs[2], 7)])]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for plan in plans:  # prefill (one chunk after position 0)
            runner.forward(plan)
        for s in seqs:
            s.prefilled, s.generated = s.prompt_len, 1
        runner.forward(StepPlan(None, seqs, []))  # decode (padded to 4 in the static layout)
    reads = [e.name for e in prof.events() if e.name in READS]
    assert reads == []


def test_a_base_only_step_builds_no_adapter_plan(varied_base, monkeypatch):
    """Nothing in a base-only step reads an adapter plan: none is built (no slot tensors made and copied)."""
    from server.engine import runner as runner_module

    def refuse(*args, **kwargs):
        raise AssertionError("adapter plan built for a base-only step")

    cache = kv_cache.KVCache.for_model(varied_base.model.config, 4, 64, varied_base.device, varied_base.dtype)
    runner = Runner(varied_base, cache)
    seq = FakeSequence(list(range(3, 9)), row=0)
    expected = runner.forward(StepPlan(None, [], [(seq, 6)]))
    monkeypatch.setattr(runner_module.AdapterBatch, "build", refuse)
    assert torch.equal(runner.forward(StepPlan(None, [], [(seq, 6)])), expected)
