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
from typing import Any, Literal

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
    n: int = 1  # sequences sampled from the one prompt (one prefill, forked KV rows)
    logprobs: int | None = None  # None = off; k = the chosen token's logprob and the top k alternatives
    frequency_penalty: float = 0.0  # OpenAI: minus penalty * count of the token in the output so far
    presence_penalty: float = 0.0  # OpenAI: minus penalty once the token occurs in the output
    repetition_penalty: float = 1.0  # HF/vLLM: divide (positive) / multiply (negative) logits of seen tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked out until this many tokens exist
    stop_token_ids: tuple[int, ...] = ()  # finish ("stop") when one of these is sampled
    ignore_eos: bool = False  # keep going past EOS (until max_new_tokens or a stop)
    grammar: Any = None  # server.engine.grammar.Grammar: the output must match it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the sampler must change this row's logits before drawing (the slow path)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    def validate(self, *, limit: int, max_stop_strings: int, max_stop_chars: int, vocab: int | None = None,
                 max_n: int = 1, max_logit_bias: int = 300, max_top_logprobs: int = 20) -> None:
        """Field-named 4xx messages; also guards callers that bypass the HTTP schemas."""
        self._validate_decoding(vocab, max_n, max_logit_bias, max_top_logprobs)
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

    def _validate_decoding(self, vocab: int | None, max_n: int, max_logit_bias: int, max_top_logprobs: int) -> None:
        if not 1 <= self.n <= max_n:
            raise InvalidRequest(f"n must be between 1 and {max_n} (the server's batch size), got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_top_logprobs:
            raise InvalidRequest(f"logprobs must be between 0 and {max_top_logprobs}, got {self.logprobs}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be between -2 and 2, got {value}")
        if not math.isfinite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise InvalidRequest(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if len(self.logit_bias) > max_logit_bias:
            raise InvalidRequest(f"logit_bias: at most {max_logit_bias} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias: the bias of token {token} must be between -100 and 100")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(f"min_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                                 f"got {self.min_tokens}")
        ids = [t for t, _ in self.logit_bias] + list(self.stop_token_ids)
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < vocab)
            field = "logit_bias" if bad in dict(self.logit_bias) else "stop_token_ids"
            raise InvalidRequest(f"{field}: token id {bad} is outside the vocabulary (0..{vocab - 1})")


@dataclass(frozen=True)
class TokenEvent:
    text: str  # new text since the previous event (never past a stop string); may be "" at the end
    token_ids: tuple[int, ...]  # every id sampled since the previous event (EOS included)
    index: int = 0  # which of the request's n sequences
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when the request asked for logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the most likely alternatives, from the distribution drawn from."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    index: int = 0  # which of the request's n sequences
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)


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
    tenant: str = ""  # whose request it is: fair admission and per-tenant caps
    cancelled: bool = False  # set by the handler (any thread); the engine acts at its next step

    def cancel(self) -> None:
        self.cancelled = True
