"""The engine ↔ adapter-manager seam: per-row slots in the AdapterMapping, pins, waiting, lanes."""

from __future__ import annotations

import asyncio

import pytest

from server.adapters.runtime.step import current_step
from server.engine.request import Request, RequestStream, SamplingParams


class Manager:
    """Implements exactly the documented manager protocol, nothing else."""

    def __init__(self, slots: dict[str, int | None], lanes: dict[str, int] | None = None) -> None:
        self.slots = slots
        self.lanes = lanes or {}
        self.pins: dict[str, int] = {}
        self.released: list[str] = []

    def acquire(self, key: str) -> int | None:
        if key == "broken":
            raise RuntimeError("adapter failed to load")
        slot = self.slots.get(key)
        if slot is not None:
            self.pins[key] = self.pins.get(key, 0) + 1
        return slot

    def release(self, key: str) -> None:
        self.pins[key] -= 1
        self.released.append(key)

    def lane_of(self, key: str) -> int | None:
        return self.lanes.get(key)

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1


@pytest.fixture
def mappings(varied_base):
    """Every AdapterMapping the model's forward ran under, as (token slots, lane)."""
    seen: list[tuple[tuple[int, ...], int | None]] = []

    def hook(module, args):
        step = current_step()
        m = None if step is None or step.adapters is None else step.adapters.mapping
        seen.append((tuple(m.token_slots.tolist()), m.lane) if m is not None else None)

    handle = varied_base.model.model.embed_tokens.register_forward_pre_hook(hook)
    yield seen
    handle.remove()


def req(base, key: str | None, n: int = 6) -> Request:
    return Request(base.tokenizer("Hello there")["input_ids"], SamplingParams(max_new_tokens=n), RequestStream(),
                   adapter_key=key)


async def drain(r: Request):
    from server.engine.request import ErrorEvent, FinishEvent

    while True:
        ev = await asyncio.wait_for(r.stream.get(), 30)
        if isinstance(ev, (FinishEvent, ErrorEvent)):
            return ev


def test_rows_carry_their_slot_and_unready_adapters_do_not_block(make_engine, varied_base, mappings):
    manager = Manager({"ready": 3, "late": None})
    engine = make_engine(max_batch=4, placement=manager)

    async def go():
        late, ready, plain = req(varied_base, "late"), req(varied_base, "ready"), req(varied_base, None)
        for r in (late, ready, plain):
            engine.submit(r)
        done = await asyncio.gather(drain(ready), drain(plain))
        assert engine.stats()["waiting"] == 1  # "late" is still waiting, and did not hold the others up
        manager.slots["late"] = 5
        engine.wake()
        return done, await drain(late)

    (ready_ev, plain_ev), late_ev = asyncio.run(go())
    assert ready_ev.finish_reason == plain_ev.finish_reason == late_ev.finish_reason == "length"
    flat = [s for m in mappings if m for s in m[0]]
    assert {3, -1, 5} <= set(flat) and set(flat) <= {3, -1, 5}
    assert all(m is not None for m in mappings)  # every forward ran under a mapping
    assert manager.pins == {"ready": 0, "late": 0} and sorted(manager.released) == ["late", "ready"]


def test_manager_errors_fail_only_that_request(make_engine, varied_base):
    engine = make_engine(placement=Manager({}))

    async def go():
        broken, ok = req(varied_base, "broken"), req(varied_base, None)
        engine.submit(broken)
        engine.submit(ok)
        return await drain(broken), await drain(ok)

    broken_ev, ok_ev = asyncio.run(go())
    assert "adapter failed to load" in str(broken_ev.error)
    assert ok_ev.finish_reason == "length"


def test_adapter_request_without_a_manager_is_refused(make_engine, varied_base):
    engine = make_engine()

    async def go():
        r = req(varied_base, "anything")
        engine.submit(r)
        return await drain(r)

    ev = asyncio.run(go())
    assert getattr(ev.error, "status", None) == 404


def test_merged_lane_steps_are_never_mixed_with_the_shared_lane(make_engine, varied_base, mappings):
    engine = make_engine(max_batch=4, placement=Manager({"dedicated": 2, "shared": 1}, lanes={"dedicated": 7}))

    async def go():
        rs = [req(varied_base, "dedicated", 10), req(varied_base, "shared", 10), req(varied_base, None, 10)]
        for r in rs:
            engine.submit(r)
        return await asyncio.gather(*(drain(r) for r in rs))

    results = asyncio.run(go())
    assert all(ev.finish_reason == "length" for ev in results)
    lanes = [m[1] for m in mappings]
    assert 7 in lanes and None in lanes
    for slots, lane in mappings:
        if lane == 7:
            assert set(slots) == {-1}  # a merged copy needs no adapter math
        else:
            assert set(slots) <= {1, -1}
    # Lanes alternate while both have work (no lane starves).
    assert any(a != b for a, b in zip(lanes, lanes[1:]))


def test_merged_lane_requests_need_no_device_slot(make_engine, varied_base, mappings):
    """Every slot taken (acquire says None): a request of a merged adapter still runs, in its lane, pinned."""
    manager = Manager({"dedicated": None}, lanes={"dedicated": 3})
    engine = make_engine(max_batch=4, placement=manager)

    async def go():
        r = req(varied_base, "dedicated", 4)
        engine.submit(r)
        return await drain(r)

    assert asyncio.run(go()).finish_reason == "length"
    assert {lane for _, lane in mappings} == {3}
    assert manager.pins == {"dedicated": 0} and manager.released == ["dedicated"]  # pinned, then released


def test_lm_head_gets_a_mapping_of_exactly_its_rows(make_engine, varied_base):
    """Adapters may target lm_head: it only sees sampling rows, and its mapping must match them."""
    engine = make_engine(max_batch=4, placement=Manager({"a": 2}))
    seen: list[tuple[int, tuple[int, ...]]] = []

    def hook(module, args):
        seen.append((args[0].shape[0], tuple(current_step().adapters.mapping.token_slots.tolist())))

    handle = varied_base.model.lm_head.register_forward_pre_hook(hook)
    try:
        async def go():
            rs = [req(varied_base, "a", 4), req(varied_base, None, 4)]
            for r in rs:
                engine.submit(r)
            return await asyncio.gather(*(drain(r) for r in rs))

        asyncio.run(go())
    finally:
        handle.remove()
    assert seen and all(rows == len(slots) for rows, slots in seen)
    assert any(set(slots) == {2, -1} for _, slots in seen)
