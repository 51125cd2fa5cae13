"""The waiting queue: bounded, asked from any thread, and the one an engine built with it admits from."""

from __future__ import annotations

import pytest

from server.engine.engine import Engine
from server.engine.request import Request, RequestStream, SamplingParams
from server.engine.waiting import WaitingQueue
from server.errors import QueueFull
from server.settings import Settings


def request(adapter_key=None) -> Request:
    """A request as a handler makes it (its stream needs the running event loop: tests here are async)."""
    return Request([1, 2, 3], SamplingParams(max_new_tokens=1), RequestStream(), adapter_key=adapter_key)


async def test_push_past_max_queue_is_queue_full():
    queue = WaitingQueue(max_queue=2)
    queue.push(request())
    queue.push(request())
    with pytest.raises(QueueFull):
        queue.push(request())
    assert len(queue) == 2


async def test_is_queued_names_only_versions_a_waiting_request_holds():
    queue = WaitingQueue(max_queue=4)
    held = request(adapter_key=("alice", "a", 1))
    queue.push(held)
    assert queue.is_queued(("alice", "a", 1)) and not queue.is_queued(("alice", "a", 2))
    assert queue.discard(held) and not queue.discard(held)
    assert not queue.is_queued(("alice", "a", 1))


async def test_take_cancelled_removes_only_cancelled_requests_in_order():
    queue = WaitingQueue(max_queue=4)
    a, b, c = request(), request(), request()
    for r in (a, b, c):
        queue.push(r)
    b.cancel()
    assert queue.take_cancelled() == [b]
    assert queue.snapshot() == [a, c] and queue.take_cancelled() == []
    assert queue.drain() == [a, c] and len(queue) == 0


def test_an_engine_admits_from_the_queue_it_is_given_even_when_empty(varied_base):
    queue = WaitingQueue(max_queue=3)  # empty, so falsy: `queue or WaitingQueue()` would drop it
    engine = Engine(varied_base, Settings(model="unused", device="cpu", dtype="float32", max_queue=3),
                    waiting=queue)
    assert engine.waiting is queue and engine.scheduler.waiting is queue
