"""Preemption for a tenant below its share: which sequence gives its row (no model, no clock), and that a
preempted-and-resumed sequence produces exactly what it produces uninterrupted (real model, real adapters)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.fairness import FairShare
from server.engine.kv_cache import KVCache
from server.engine.preemption import MAX_PREEMPTIONS, Preemption
from server.engine.request import Request, RequestStream, SamplingParams
from server.engine.scheduler import Removals, Scheduler
from server.engine.sequence import Sequence
from server.engine.waiting import WaitingQueue


class Equal:
    def weight(self, tenant: str) -> float:
        return 1.0

    def max_running(self, tenant: str) -> int | None:
        return None


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def request(loop, tenant: str, n: int = 1) -> Request:
    async def make() -> Request:
        return Request([1, 2, 3, 4], SamplingParams(max_new_tokens=50, n=n), RequestStream(), tenant=tenant)
    return loop.run_until_complete(make())


def scheduler(max_batch: int, preempt: bool = True) -> tuple[Scheduler, list[str]]:
    """A scheduler over a KV cache of `max_batch` rows; the hooks' calls are logged."""
    cache = KVCache(1, max_batch, 1, 64, 2, torch.device("cpu"), torch.float32)
    calls: list[str] = []

    def new_sequence(req: Request, row: int, slot: int, lane: int | None, index: int) -> Sequence:
        return Sequence(req, row=row, detok=None, generator=None, slot=slot, lane=lane, index=index)

    share = FairShare(Equal())
    preemption = Preemption(Equal(), max_batch, lambda s: calls.append(f"suspend {s.row}"),
                            lambda s: calls.append(f"resume {s.row}")) if preempt else None
    return Scheduler(cache, max_batch, WaitingQueue(100), 512, new_sequence, share=share,
                     preemption=preemption), calls


def decode(sched: Scheduler, steps: int) -> None:
    """Every running sequence finishes its prompt and samples `steps` tokens."""
    for s in sched.running:
        s.prefilled = s.fill_len
        s.resume_ids = None
        for _ in range(steps):
            s.generated += 1
            s.output.append(100 + s.generated)
            s.last_token = s.output[-1]


def test_an_under_share_tenant_preempts_the_youngest_of_the_one_over_share(loop) -> None:
    sched, calls = scheduler(4)
    heavy = [request(loop, "a") for _ in range(6)]
    for r in heavy:
        sched.waiting.push(r)
    sched.schedule(Removals())
    decode(sched, 3)
    light = request(loop, "b")
    sched.waiting.push(light)
    plan = sched.schedule(Removals())
    assert [s.request for s in sched.running] == [*heavy[:3], light]
    assert plan is not None and not plan.decode and plan.prefill == [(sched.running[-1], 4)]  # a step of its own
    (victim,) = sched.preempted.values()
    assert victim.request is heavy[3] and calls == ["suspend 3"]  # the youngest running one
    assert victim.resume_ids == [1, 2, 3, 4, 101, 102] and victim.prefilled == 0 and victim.preemptions == 1
    assert victim.generated == 3 and victim.last_token == 103  # decoding resumes from the unfed token
    plan = sched.schedule(Removals())
    assert len(sched.preempted) == 1  # a is over its share: its waiting requests never preempt
    assert plan is not None and len(plan.decode) == 3  # the others decode again from the next step

    sched.finish(sched.running[-1])  # b's request ends: a's preempted one goes before a's waiting ones
    plan = sched.schedule(Removals())
    assert sched.running[-1] is victim and not sched.preempted and calls[-1] == f"resume {victim.row}"
    assert plan is not None and plan.prefill == [(victim, 6)] and plan.sampling() == sched.running[:3]
    assert plan.chunk(victim, 6) == [1, 2, 3, 4, 101, 102]  # recomputed, nothing sampled at its end


def test_no_tenant_is_pushed_below_its_share_and_n_gt_1_is_never_a_victim(loop) -> None:
    sched, _ = scheduler(4)
    for r in [request(loop, "a", n=2), request(loop, "a"), request(loop, "c")]:
        sched.waiting.push(r)
    sched.schedule(Removals())
    decode(sched, 1)
    for _ in range(3):
        sched.waiting.push(request(loop, "b"))
    sched.schedule(Removals())
    # shares with a, b, c active: 4/3 rows each. a (3 rows) gives its n = 1 sequence; its n = 2 request
    # stays, and c (1 row) is never preempted; b gets one row, not three.
    assert sorted(s.request.tenant for s in sched.running) == ["a", "a", "b", "c"]
    assert [s.request.tenant for s in sched.preempted.values()] == ["a"]


def test_a_sequence_is_preempted_at_most_max_times(loop) -> None:
    sched, _ = scheduler(2)
    for r in [request(loop, "a"), request(loop, "a")]:
        sched.waiting.push(r)
    sched.schedule(Removals())
    decode(sched, 1)
    for _ in range(2 * MAX_PREEMPTIONS):  # the youngest first, then the other one
        sched.waiting.push(request(loop, "b"))
        sched.schedule(Removals())
        b = next(s for s in sched.running if s.request.tenant == "b")
        sched.finish(b)  # b's request ends at once; the victim comes back
        sched.schedule(Removals())
        decode(sched, 1)
    assert [s.preemptions for s in sched.running] == [MAX_PREEMPTIONS, MAX_PREEMPTIONS]
    sched.waiting.push(request(loop, "b"))
    sched.schedule(Removals())
    assert not sched.preempted and all(s.request.tenant == "a" for s in sched.running)  # b waits its turn


def test_without_preemption_a_full_batch_makes_every_tenant_wait(loop) -> None:
    sched, calls = scheduler(2, preempt=False)
    for r in [request(loop, "a"), request(loop, "a")]:
        sched.waiting.push(r)
    sched.schedule(Removals())
    sched.waiting.push(request(loop, "b"))
    sched.schedule(Removals())
    assert [s.request.tenant for s in sched.running] == ["a", "a"] and not sched.preempted and not calls


def test_a_preempted_sequence_keeps_its_lane_in_use(loop) -> None:
    """A merged copy's weights may change only when no sequence runs on its lane; a preempted one resumes there."""
    sched, _ = scheduler(2)
    sched.waiting.push(request(loop, "a"))
    sched.waiting.push(request(loop, "a"))
    sched.schedule(Removals())
    sched.running[1].lane = 3  # the youngest runs on a merged copy
    decode(sched, 1)
    sched.waiting.push(request(loop, "b"))
    sched.schedule(Removals())
    assert [s.lane for s in sched.preempted.values()] == [3] and sched.lanes_in_use() == {None, 3}


def test_a_cancelled_preempted_sequence_is_reaped(loop) -> None:
    sched, _ = scheduler(2)
    sched.waiting.push(request(loop, "a"))
    sched.waiting.push(request(loop, "a"))
    sched.schedule(Removals())
    decode(sched, 2)
    sched.waiting.push(request(loop, "b"))
    sched.schedule(Removals())
    (victim,) = sched.preempted.values()
    victim.request.cancel()
    removals = Removals()
    sched.schedule(removals)
    assert removals.cancelled == [victim] and not sched.preempted


# --- the engine: preempted and resumed == uninterrupted ------------------------------------------------------

KINDS = {"all": "lora_all", "miss": "miss_balance"}  # adapter key -> kind; its slot = its order


@pytest.fixture(scope="module")
def adapted(varied_model_dir, tmp_path_factory):
    """A base of its own with two real adapters in device slots (adapter math changes every token)."""
    from server.adapters.limits import AdapterLimits
    from server.adapters.peft.peft_format import read_adapter
    from server.adapters.runtime.inject import inject_adapter_layers
    from server.model.load import load_base
    from server.settings import Settings
    from tests.adapters import adapter_factory as af

    base = load_base(Settings(model=str(varied_model_dir), device="cpu", dtype="float32"))
    limits = AdapterLimits(max_adapters_resident=len(KINDS), max_rank=16)
    tmp = tmp_path_factory.mktemp("preemption")
    for slot, (key, kind) in enumerate(KINDS.items()):
        af.make_peft(base, kind, tmp / key, seed=70 + slot, scale=0.5)
    layers = inject_adapter_layers(base.model, limits)
    for slot, key in enumerate(KINDS):
        layers.load_slot(slot, read_adapter(tmp / key, base, limits))
    return base


def heavy_jobs(base, grammar) -> list[tuple[list[int], str | None, SamplingParams]]:
    """Four long generations, oldest first: the youngest two (sampled, with penalties, logprobs, min_tokens,
    a stop string, a grammar) are the ones preempted."""
    words = "the quick brown fox jumps over the lazy dog while seven sailors sing about the sea " * 3
    ids = base.tokenizer(words)["input_ids"]  # > 32 tokens: whole prefix-cache blocks
    return [
        (ids[:40], "all", SamplingParams(max_new_tokens=40, ignore_eos=True)),
        (ids[3:20], None, SamplingParams(max_new_tokens=40, ignore_eos=True)),
        (ids[5:60], "miss", SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=11,
                                           frequency_penalty=0.5, repetition_penalty=1.3, logprobs=2,
                                           min_tokens=30, stop=("sailor song",))),
        (ids[1:45], "all", SamplingParams(max_new_tokens=40, temperature=1.0, top_k=50, seed=5, grammar=grammar)),
    ]


async def _collect(request: Request, started: asyncio.Event | None = None) -> tuple:
    from server.engine.request import ErrorEvent, FinishEvent, TokenEvent

    tokens, text, logprobs = [], "", []
    while True:
        event = await asyncio.wait_for(request.stream.get(), 120)
        if isinstance(event, TokenEvent):
            tokens.extend(event.token_ids)
            text += event.text
            logprobs.extend((lp.token_id, round(lp.logprob, 4)) for lp in event.logprobs)
            if started is not None and event.token_ids:
                started.set()
        elif isinstance(event, FinishEvent):
            assert event.completion_tokens == len(tokens)  # every token reported once, none lost
            return tokens, text, logprobs, event.finish_reason
        elif isinstance(event, ErrorEvent):
            raise event.error


def _run(engine, base, with_light: bool) -> tuple[list[tuple], list[tuple], int]:
    """The heavy tenant's four results; with the light tenant's two requests sent once all four are decoding,
    theirs too, and how many heavy requests had finished when the light ones had."""
    from server.engine.grammar import GrammarCompiler

    async def go():
        compiler = GrammarCompiler(base.tokenizer, engine.vocab, engine.eos_ids)
        grammar = await compiler.get("regex", "[a-z ]{10,200}", "regex")
        heavy = [Request(p, params, RequestStream(), adapter_key=key, tenant="heavy")
                 for p, key, params in heavy_jobs(base, grammar)]
        started = [asyncio.Event() for _ in heavy]
        for r in heavy:
            engine.submit(r)
        tasks = [asyncio.create_task(_collect(r, e)) for r, e in zip(heavy, started)]
        light_out, heavy_done = [], 0
        if with_light:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)  # all four are decoding
            light = [Request(base.tokenizer(t)["input_ids"], SamplingParams(max_new_tokens=4), RequestStream(),
                             adapter_key=key, tenant="light") for t, key in (("Hi!", "miss"), ("Hello", None))]
            for r in light:
                engine.submit(r)
            light_out = await asyncio.gather(*(_collect(r) for r in light))
            heavy_done = sum(t.done() for t in tasks)
        compiler.close()
        return await asyncio.gather(*tasks), light_out, heavy_done

    return asyncio.run(go())


def test_preempted_sequences_resume_exactly(make_engine, adapted) -> None:
    from tests.harness import FixedSlots

    placement = FixedSlots({k: s for s, k in enumerate(KINDS)})
    want, _, _ = _run(make_engine(base=adapted, placement=placement, max_batch=4, preemption=False), adapted, False)
    engine = make_engine(base=adapted, placement=placement, max_batch=4)
    got, light, heavy_done = _run(engine, adapted, True)
    assert heavy_done == 0  # the light tenant did not wait for a heavy request to end
    assert engine.preemptions["heavy"] == 2 and engine.preemptions["light"] == 0
    assert engine.stats()["recomputed_tokens"] > 0 and engine.stats()["preempted"] == 0
    assert [len(t) for t, *_ in light] == [4, 4]
    assert got == want  # tokens, streamed text, logprobs, finish reasons
    assert want[2][2] and len({tuple(t) for t, *_ in want}) == 4  # logprobs came; outputs differ


def test_without_preemption_the_light_tenant_waits_for_a_row(make_engine, adapted) -> None:
    from tests.harness import FixedSlots

    engine = make_engine(base=adapted, placement=FixedSlots({k: s for s, k in enumerate(KINDS)}), max_batch=4,
                         preemption=False)
    _, _, heavy_done = _run(engine, adapted, True)
    assert heavy_done > 0 and not engine.preemptions


# --- interrupted steps: abandoned between layers, run again, nothing changes ------------------------------------

def _interrupting(engine, base, every: int) -> list:
    """Forward hooks that interrupt the engine's step in flight at every `every`-th layer call: before a layer's
    attention (first layer) and after the last layer (before the LM head), alternately."""
    layers = base.model.model.layers
    calls = iter(range(10**9))

    def hook(*_args) -> None:
        if next(calls) % every == every - 1:
            engine.interrupts.request()

    return [layers[0].register_forward_pre_hook(hook), layers[-1].register_forward_hook(hook)]


def test_interrupted_steps_change_no_output(make_engine, adapted) -> None:
    """Greedy, sampled (seeded, penalties), logprobs, min_tokens, stop strings and a grammar: the same tokens
    with steps abandoned mid-forward and run again, and no tenant charged for a step that did not run."""
    from tests.harness import FixedSlots

    placement = FixedSlots({k: s for s, k in enumerate(KINDS)})
    uninterrupted = make_engine(base=adapted, placement=placement, max_batch=4)
    want, _, _ = _run(uninterrupted, adapted, False)
    engine = make_engine(base=adapted, placement=placement, max_batch=4)
    hooks = _interrupting(engine, adapted, every=3)
    try:
        got, _, _ = _run(engine, adapted, False)
    finally:
        for h in hooks:
            h.remove()
    stats = engine.stats()
    assert stats["interrupted_steps"] > 5
    assert got == want
    assert engine.scheduler.share.counters["heavy"] == pytest.approx(uninterrupted.scheduler.share.counters["heavy"])


def test_only_a_request_that_would_preempt_now_interrupts(make_engine, adapted) -> None:
    """The engine's guess at submission: the step in flight is interrupted for a request that the
    preemption rule would give a row now (full batch, its tenant has nothing running and a share of at
    least one row), not for the tenant filling the batch nor for one whose share is under a row."""
    from tests.harness import FixedSlots

    engine = make_engine(base=adapted, placement=FixedSlots({k: s for s, k in enumerate(KINDS)}), max_batch=4)

    def req(tenant: str) -> Request:
        return Request([1, 2, 3], SamplingParams(max_new_tokens=200, ignore_eos=True), RequestStream(),
                       tenant=tenant)

    async def filled_by(tenants: list[str], asks: list[str]) -> list[bool]:
        running = [req(t) for t in tenants]
        started = [asyncio.Event() for _ in running]
        for r in running:
            engine.submit(r)
        tasks = [asyncio.create_task(_collect(r, e)) for r, e in zip(running, started)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        engine.wake()
        await asyncio.sleep(0.05)  # an admission pass has seen every tenant running
        answers = [engine.scheduler.would_preempt(req(t)) for t in asks]
        for r in running:
            engine.cancel(r)
        await asyncio.gather(*tasks, return_exceptions=True)
        return answers

    async def go() -> tuple[bool, list[bool], list[bool]]:
        idle = engine.scheduler.would_preempt(req("light"))
        return idle, await filled_by(["heavy"] * 4, ["light", "heavy"]), await filled_by(["a", "b", "c", "d"], ["e"])

    idle, one_heavy, four_tenants = asyncio.run(go())
    assert not idle
    assert one_heavy == [True, False]
    assert four_tenants == [False], "five tenants on four rows: a newcomer's share is under one row"
