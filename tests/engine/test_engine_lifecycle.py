"""Engine control flow: bounded queue, cancellation, background work, failures."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.request import ErrorEvent, FinishEvent, Request, RequestStream, SamplingParams
from server.errors import QueueFull, Unavailable
from tests.engine.conftest import run
from tests.harness import Gate, wait_until


def ids_of(base, text: str = "Hello there") -> list[int]:
    return base.tokenizer(text)["input_ids"]


async def next_event(request: Request, timeout: float = 30):
    return await asyncio.wait_for(request.stream.get(), timeout)


def test_queue_full_raises_and_the_queue_drains(make_engine, varied_base):
    gate = Gate()
    engine = make_engine(max_batch=1, max_queue=2, background=gate)

    async def go():
        gate.arm()
        assert await asyncio.to_thread(gate.entered.wait, 10)  # engine thread is parked
        reqs = [Request(ids_of(varied_base), SamplingParams(max_new_tokens=4), RequestStream()) for _ in range(3)]
        engine.submit(reqs[0])
        engine.submit(reqs[1])
        with pytest.raises(QueueFull) as err:
            engine.submit(reqs[2])
        assert err.value.status == 429 and err.value.headers["Retry-After"]
        assert engine.stats()["waiting"] == 2
        gate.release()
        finishes = []
        for r in reqs[:2]:
            while not isinstance(ev := await next_event(r), FinishEvent):
                pass
            finishes.append(ev.finish_reason)
        return finishes

    assert asyncio.run(go()) == ["length", "length"]
    assert engine.stats()["waiting"] == 0


def test_cancel_frees_the_row_at_the_next_step(make_engine, varied_base):
    gate = Gate()
    engine = make_engine(max_batch=2, train_interleave_steps=1, background=gate)

    async def go():
        r = Request(ids_of(varied_base), SamplingParams(max_new_tokens=400), RequestStream())
        engine.submit(r)
        await next_event(r)  # decoding
        gate.arm()
        assert await asyncio.to_thread(gate.entered.wait, 10)
        assert engine.stats()["running"] == 1 and engine.stats()["free_kv_rows"] == 1
        engine.cancel(r)
        gate.release()
        while not isinstance(ev := await next_event(r), FinishEvent):
            pass
        return ev

    ev = asyncio.run(go())
    assert ev.finish_reason == "cancelled" and ev.completion_tokens < 400
    assert wait_until(lambda: engine.stats()["running"] == 0)
    assert engine.stats()["free_kv_rows"] == 2


def test_cancel_while_waiting(make_engine, varied_base):
    gate = Gate()
    engine = make_engine(max_batch=1, background=gate)

    async def go():
        gate.arm()
        assert await asyncio.to_thread(gate.entered.wait, 10)
        r = Request(ids_of(varied_base), SamplingParams(max_new_tokens=4), RequestStream())
        engine.submit(r)
        engine.cancel(r)
        gate.release()
        return await next_event(r)

    ev = asyncio.run(go())
    assert isinstance(ev, FinishEvent) and ev.finish_reason == "cancelled" and ev.completion_tokens == 0


class CountingWorker:
    def __init__(self, steps: int) -> None:
        self.left = steps
        self.ran = 0

    def has_work(self) -> bool:
        return self.left > 0

    def run_one_step(self) -> None:
        self.left -= 1
        self.ran += 1


def test_background_work_runs_when_idle(make_engine):
    worker = CountingWorker(5)
    engine = make_engine(background=worker)
    assert wait_until(lambda: worker.ran == 5)
    assert engine.stats()["background_steps"] == 5


def test_background_work_is_interleaved_not_starved_when_busy(make_engine, varied_base):
    worker = CountingWorker(0)  # no work until the requests go in
    engine = make_engine(max_batch=4, train_interleave_steps=3, background=worker)
    steps_before = engine.steps

    async def go():
        worker.left = 1000
        return await asyncio.gather(*(run(engine, ids_of(varied_base), max_new_tokens=30) for _ in range(4)))

    results = asyncio.run(go())
    worker.left = 0
    serving_steps = engine.steps - steps_before
    assert all(r.finish_reason == "length" for r in results)
    assert worker.ran >= serving_steps // 3  # at least one training step per 3 serving steps


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, varied_base, monkeypatch):
    engine = make_engine()
    real_forward = engine.runner.forward
    calls = {"n": 0}

    def flaky(plan, interrupt=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real_forward(plan, interrupt)

    monkeypatch.setattr(engine.runner, "forward", flaky)

    async def go():
        with pytest.raises(Exception) as err:
            await run(engine, ids_of(varied_base), max_new_tokens=4)
        ok = await run(engine, ids_of(varied_base), max_new_tokens=4)
        return err.value, ok

    error, ok = asyncio.run(go())
    assert getattr(error, "status", None) == 500 and "RuntimeError" in str(error)
    assert ok.finish_reason == "length"
    stats = engine.stats()
    assert stats["alive"] and stats["step_errors"] == 1 and stats["free_kv_rows"] == stats["max_batch"]


def test_a_dead_engine_fails_waiting_requests_instead_of_hanging(make_engine, varied_base):
    gate = Gate()
    engine = make_engine(max_batch=1, background=gate)

    def boom(removals):
        raise SystemExit("engine thread killed")  # BaseException: escapes the per-step guard

    async def go():
        gate.arm()
        assert await asyncio.to_thread(gate.entered.wait, 10)
        r = Request(ids_of(varied_base), SamplingParams(max_new_tokens=4), RequestStream())
        engine.submit(r)
        engine.scheduler.schedule = boom
        gate.release()
        ev = await next_event(r)
        assert wait_until(lambda: not engine.alive)
        with pytest.raises(Unavailable):
            engine.submit(Request(ids_of(varied_base), SamplingParams(), RequestStream()))
        return ev

    ev = asyncio.run(go())
    assert isinstance(ev, ErrorEvent) and isinstance(ev.error, Unavailable)
