"""A generation request as the engine sees it, and the channel its tokens flow back on.

HTTP handlers build a `Request` (token ids + `SamplingParams` + optional adapter
key) and await its `RequestStream`; only the engine thread mutates anything
else. The stream hands events to the handler's event loop thread-safely
(`loop.call_soon_threadsafe`), so the engine never blocks on a slow client.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

from server.errors import InvalidRequest

FinishReason = Literal["stop", "length", "cancelled"]

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, *, limit: int, max_stop_strings: int, max_stop_chars: int) -> None:
        """Field-named 4xx messages; also guards callers that bypass the HTTP schemas."""
        if not 1 <= self.max_new_tokens <= limit:
            raise InvalidRequest(f"max_new_tokens must be between 1 and {limit}, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if len(self.stop) > max_stop_strings:
            raise InvalidRequest(f"stop: at most {max_stop_strings} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequest("stop: stop strings must not be empty")
            if len(s) > max_stop_chars:
                raise InvalidRequest(f"stop: each stop string is at most {max_stop_chars} characters")


@dataclass(frozen=True)
class TokenEvent:
    text: str  # new text since the previous event (never past a stop string); may be "" at the end
    token_ids: tuple[int, ...]  # every id sampled since the previous event (EOS included)


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    error: Exception


Event = TokenEvent | FinishEvent | ErrorEvent


class RequestStream:
    """Engine thread → one asyncio consumer. Created on the consumer's loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Called from the engine thread; never blocks, tolerates a closed loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening
            pass

    async def get(self) -> Event:
        return await self._queue.get()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    adapter_key: Hashable | None = None  # None = base model; else resolved by the adapter manager
    request_id: str = field(default_factory=lambda: f"gen-{uuid.uuid4().hex[:24]}")
    arrival: int = field(default_factory=lambda: next(_ids))  # FIFO order
    label: str = ""  # the route that submitted it (metrics)
    cancelled: bool = False  # set by the handler (any thread); the engine acts at its next step

    def cancel(self) -> None:
        self.cancelled = True
