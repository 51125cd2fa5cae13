"""Fair admission: the virtual-token-counter order, lifting idle tenants, weights, per-tenant caps, and the
scheduler admitting by it when the batch is full (deterministic: no model, no clock)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.fairness import OUTPUT_COST, PROMPT_COST, FairShare
from server.engine.kv_cache import KVCache
from server.engine.request import Request, RequestStream, SamplingParams
from server.engine.scheduler import Removals, Scheduler
from server.engine.sequence import Sequence
from server.engine.waiting import WaitingQueue


class Shares:
    def __init__(self, weights: dict[str, float] | None = None, caps: dict[str, int] | None = None) -> None:
        self.weights, self.caps = weights or {}, caps or {}

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def max_running(self, tenant: str) -> int | None:
        return self.caps.get(tenant)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def request(loop, tenant: str, prompt_len: int = 4, n: int = 1) -> Request:
    async def make() -> Request:
        return Request([1] * prompt_len, SamplingParams(max_new_tokens=8, n=n), RequestStream(), tenant=tenant)
    return loop.run_until_complete(make())


def order(share: FairShare, waiting: list[Request], running: list[Sequence] = (), admit: int = 100) -> list[str]:
    """Tenants in the order one pass admits `waiting` (every request fits)."""
    admission = share.begin(list(waiting), list(running))
    out = []
    while len(out) < admit and (r := admission.next()) is not None:
        admission.admitted(r)
        out.append(r.tenant)
    return out


def test_least_served_tenant_goes_first_and_fifo_within_a_tenant(loop) -> None:
    share = FairShare()
    a = [request(loop, "a", prompt_len=10) for _ in range(3)]
    b = [request(loop, "b", prompt_len=10) for _ in range(2)]
    admission = share.begin([*a, *b], [])
    got = []
    while (r := admission.next()) is not None:
        admission.admitted(r)
        got.append(r)
    assert got == [a[0], b[0], a[1], b[1], a[2]]  # alternating by service; each tenant's own in arrival order


def test_fairness_off_is_arrival_order(loop) -> None:
    waiting = [request(loop, t, prompt_len=10) for t in "aaab"]
    assert order(FairShare(fair=False), waiting) == list("aaab")
    assert order(FairShare(fair=True), waiting) == list("abaa")


def test_weights_share_service_in_proportion(loop) -> None:
    share = FairShare(Shares({"a": 3.0}))
    waiting = [request(loop, t, prompt_len=10) for t in "aaaaaabb"]
    assert order(share, waiting, admit=4) == list("abaa")  # a weighs 3: three of a's for one of b's


def test_decode_tokens_are_charged_at_output_cost_over_weight(loop) -> None:
    share = FairShare(Shares({"b": 2.0}))
    share.begin([request(loop, "a"), request(loop, "b")], [])
    a, b = (Sequence(request(loop, t), row=0, detok=None, generator=None) for t in "ab")
    share.served([a, a, b])
    assert share.counters == {"a": 2 * OUTPUT_COST, "b": OUTPUT_COST / 2}


def test_a_returning_tenant_is_lifted_to_the_least_active_counter(loop) -> None:
    """Idle time banks no credit: b, away while a was served, does not get a's backlog of service first."""
    share = FairShare()
    a_running = Sequence(request(loop, "a"), row=0, detok=None, generator=None)
    share.begin([], [a_running])
    share.served([a_running] * 50)  # a alone: 100 units
    share.begin([request(loop, "b")], [a_running])  # b arrives
    assert share.counters["b"] == share.counters["a"] == 50 * OUTPUT_COST
    share.served([a_running])
    waiting = [request(loop, t) for t in "ab"]
    assert order(share, waiting, admit=1) == ["b"]  # lifted, not past a: b is still served first


def test_lifting_never_lowers_a_counter(loop) -> None:
    share = FairShare()
    share.counters["b"] = 500.0
    a_running = Sequence(request(loop, "a"), row=0, detok=None, generator=None)
    share.begin([request(loop, "b")], [a_running])
    assert share.counters["b"] == 500.0


def test_a_tenant_at_its_cap_waits_while_others_are_admitted(loop) -> None:
    share = FairShare(Shares(caps={"a": 2}), fair=False)
    assert order(share, [request(loop, t) for t in "aaab"]) == list("aab")
    running = [Sequence(request(loop, "a"), row=i, detok=None, generator=None) for i in range(2)]
    assert order(share, [request(loop, t) for t in "ab"], running) == ["b"]
    assert order(share, [request(loop, "a", n=3)]) == []  # n sequences count against the cap


def scheduler(loop, max_batch: int, share: FairShare) -> Scheduler:
    cache = KVCache(1, max_batch, 1, 32, 2, torch.device("cpu"), torch.float32)

    def new_sequence(req: Request, row: int, slot: int, lane: int | None, index: int) -> Sequence:
        return Sequence(req, row=row, detok=None, generator=None, slot=slot, lane=lane, index=index)

    return Scheduler(cache, max_batch, WaitingQueue(100), 512, new_sequence, share=share)


def step(sched: Scheduler) -> None:
    """A scheduling pass and its step, as the engine runs them (a step that ran charges its decode rows)."""
    plan = sched.schedule(Removals())
    if plan is not None:
        sched.ran(plan)


@pytest.mark.parametrize("fair, expected", [(True, ["b", "b"]), (False, ["a", "a"])])
def test_full_batch_frees_rows_to_the_least_served_tenant(loop, fair: bool, expected: list[str]) -> None:
    """A floods and fills the batch; B queues behind. As A's rows free, VTC gives them to B, FIFO to A."""
    sched = scheduler(loop, 2, FairShare(fair=fair))
    for _ in range(6):
        sched.waiting.push(request(loop, "a"))
    sched.schedule(Removals())
    assert [s.request.tenant for s in sched.running] == ["a", "a"]
    for s in sched.running:
        s.prefilled = s.prompt_len  # decoding from now on: each step charges A
    for _ in range(2):
        sched.waiting.push(request(loop, "b"))
    step(sched)
    admitted = []
    for _ in range(2):
        sched.finish(sched.running[0])
        step(sched)
        admitted.append(sched.running[-1].request.tenant)
    assert admitted == expected


def test_admission_charges_only_the_prompt_tokens_it_computes(loop) -> None:
    """Prompt tokens copied from the prefix cache cost the server nothing: the tenant is not charged for them."""
    cache = KVCache(1, 4, 1, 64, 2, torch.device("cpu"), torch.float32)

    def new_sequence(req: Request, row: int, slot: int, lane: int | None, index: int) -> Sequence:
        seq = Sequence(req, row=row, detok=None, generator=None, slot=slot, lane=lane, index=index)
        seq.prefilled = seq.cached = 32 if req.tenant == "hit" else 0
        return seq

    share = FairShare()
    sched = Scheduler(cache, 4, WaitingQueue(10), 512, new_sequence, share=share)
    sched.waiting.push(request(loop, "hit", prompt_len=40))
    sched.waiting.push(request(loop, "miss", prompt_len=40))
    sched.schedule(Removals())
    assert share.counters == {"hit": 8 * PROMPT_COST, "miss": 40 * PROMPT_COST}
