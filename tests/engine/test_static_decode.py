"""The static (graph-ready) decode layout computes what the eager one does, padding and all.

CUDA runs the static layout (fixed shapes per batch bucket and key-length bucket, a persistent
length mask, padding rows in the KV cache's scratch row); CPU runs the eager one by default. Both
are run here on CPU, so the path a GPU takes is covered without one.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import kv_cache
from server.engine.decode_graphs import DecodeGraphs
from server.engine.engine import Engine
from server.engine.runner import Runner, RunnerOptions
from server.engine.scheduler import StepPlan
from server.settings import Settings
from tests.engine.fake_sequence import FakeSequence
from tests.engine.test_batching import alone_then_together

LENGTHS = (5, 9, 7, 12, 6, 8)


def _runner(base, options: RunnerOptions) -> Runner:
    cache = kv_cache.KVCache.for_model(base.model.config, 8, 64, base.device, base.dtype)
    return Runner(base, cache, options)


def _prefilled(runner: Runner) -> list[FakeSequence]:
    seqs = [FakeSequence(list(range(3, 3 + n)), row=i) for i, n in enumerate(LENGTHS)]
    for s in seqs:
        runner.forward(StepPlan(None, [], [(s, s.prompt_len)]))
        s.prefilled, s.generated = s.prompt_len, 1
    return seqs


def test_static_decode_matches_eager_with_holes_padding_and_prefill(varied_base):
    eager = _runner(varied_base, RunnerOptions())
    static = _runner(varied_base, RunnerOptions(static_decode=True, buckets=(4, 8)))
    e_seqs, s_seqs = _prefilled(eager), _prefilled(static)
    for pick in ([0, 2, 3, 5], [0, 2, 3], [1]):  # holes; padded 3 -> 4; padded 1 -> 4
        e = eager.forward(StepPlan(None, [e_seqs[i] for i in pick], []))
        s = static.forward(StepPlan(None, [s_seqs[i] for i in pick], []))
        assert s.shape == e.shape == (len(pick), varied_base.model.config.vocab_size)
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5)
        assert torch.equal(s.argmax(-1), e.argmax(-1))
    # A mixed step: decode rows plus a new prompt's chunk (no padding, the chunk's end samples).
    new_e, new_s = FakeSequence(list(range(40, 50)), row=6), FakeSequence(list(range(40, 50)), row=6)
    e = eager.forward(StepPlan(None, e_seqs[:3], [(new_e, 10)]))
    s = static.forward(StepPlan(None, s_seqs[:3], [(new_s, 10)]))
    assert s.shape == e.shape == (4, varied_base.model.config.vocab_size)
    torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5)


def test_padding_rows_cannot_reach_real_rows(varied_base):
    """Padding tokens write and read the scratch row only: whatever it holds, real logits do not move."""
    static = _runner(varied_base, RunnerOptions(static_decode=True, buckets=(8,)))
    seqs = _prefilled(static)
    plan = StepPlan(None, seqs[:3], [])
    clean = static.forward(plan)
    for t in (*static.cache.k, *static.cache.v):
        t[static.cache.scratch_row, :, 1:].fill_(float("nan"))
    again = static.forward(plan)
    assert torch.isfinite(again).all()
    assert torch.equal(again, clean)


def test_static_engine_is_batch_invariant_and_equals_eager(varied_base):
    """The whole engine on the static layout: same greedy tokens as the eager engine, alone or batched."""
    results = []
    for options in (RunnerOptions(), RunnerOptions(static_decode=True, buckets=(2, 4, 8))):
        engine = Engine(varied_base, Settings(model="unused", device="cpu", dtype="float32", max_batch=8),
                        runner_options=options)
        engine.start()
        try:
            results.append(asyncio.run(alone_then_together(engine, varied_base.tokenizer, 12)))
        finally:
            engine.stop()
    (e_alone, e_together), (s_alone, s_together) = results
    assert [r.tokens for r in s_alone] == [r.tokens for r in e_alone]
    assert [r.tokens for r in s_together] == [r.tokens for r in s_alone]


def test_cuda_only_options_refuse_a_cpu(varied_base):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Settings(device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA only"):
        Settings(device="cpu", cuda_sdpa="efficient")
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA only"):
        _runner(varied_base, RunnerOptions(sdpa_backends=("efficient",)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(varied_model_dir):
    from server.model.load import load_base
    base = load_base(Settings(model=str(varied_model_dir), device="cuda", dtype="float32"))
    eager = _runner(base, RunnerOptions(static_decode=True))
    graphed = _runner(base, RunnerOptions(cuda_graphs=True))
    e_seqs, g_seqs = _prefilled(eager), _prefilled(graphed)
    # Buckets (1, 2, 4, 8): 4 rows, then 3 padded to 4 (replays the first graph), then 1 (a second graph).
    for pick in ([0, 2, 3, 5], [0, 2, 3], [1]):
        e = eager.forward(StepPlan(None, [e_seqs[i] for i in pick], []))
        g = graphed.forward(StepPlan(None, [g_seqs[i] for i in pick], []))
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        for s in (*(e_seqs[i] for i in pick), *(g_seqs[i] for i in pick)):
            s.generated += 1
    assert graphed.graphs is not None and len(graphed.graphs) == 2
