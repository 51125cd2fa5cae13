"""What every generation route does: resolve the adapter, tokenize, validate, submit, await.

Handlers stay thin: they translate their body into (prompt ids, SamplingParams,
adapter key) and their output format from `Event`s. The engine thread owns the
tensors; here we only submit a `Request` and read its stream, cancelling it
when the client goes away (a watcher awaits the ASGI `http.disconnect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass

from fastapi import Request as HttpRequest

from server.adapters.types import AdapterKey
from server.api.keys import DEFAULT_TENANT, Principal
from server.api.schemas import MixMemberField
from server.engine.request import ErrorEvent, Event, FinishEvent, Request, RequestStream, SamplingParams, TokenEvent
from server.errors import ApiError, InvalidRequest, QueueFull, Unavailable
from server.logging import PRINCIPAL_SCOPE_KEY, log_generation
from server.api.services import Services

ALIVE_CHECK_S = 1.0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


async def resolve_adapter(services: Services, principal: Principal, adapter_id: str | None,
                          mix: Sequence[MixMemberField] | None = None) -> AdapterKey | None:
    """None = the base model; otherwise the manager's key (raises NotFound / AdapterError). `mix`: a
    weighted mix of the caller's adapters, served as one virtual adapter (`adapter_id` is then None)."""
    if mix is not None:
        return await services.adapters.prepare_mix(principal.tenant, [(m.id, m.weight) for m in mix])
    if adapter_id is None or adapter_id == services.base.model_id:
        return None
    return await services.adapters.prepare(principal.tenant, adapter_id)


async def encode_prompt(services: Services, prompt: str) -> list[int]:
    return await services.prompts.encode(prompt)


async def encode_chat(services: Services, messages: list[dict]) -> list[int]:
    return await services.prompts.encode_chat(messages)


def check_request(services: Services, prompt_ids: list[int], params: SamplingParams,
                  length_field: str = "max_new_tokens") -> None:
    s = services.settings
    if params.max_new_tokens > s.max_new_tokens_limit:
        raise InvalidRequest(f"{length_field} must be at most {s.max_new_tokens_limit}, got {params.max_new_tokens}")
    params.validate(limit=s.max_new_tokens_limit, max_stop_strings=s.max_stop_strings,
                    max_stop_chars=s.max_stop_chars, vocab=services.engine.vocab, max_n=s.max_batch,
                    max_logit_bias=s.max_logit_bias, max_top_logprobs=s.max_top_logprobs)
    context = services.base.max_context
    if len(prompt_ids) + params.max_new_tokens > context:
        # the encoder stops at context + 1 tokens: a prompt that long may be longer still
        size = f"over {context}" if len(prompt_ids) > context else str(len(prompt_ids))
        raise InvalidRequest(
            f"prompt ({size} tokens) + {length_field} ({params.max_new_tokens}) exceeds the "
            f"model's context of {context} tokens")


def submit(services: Services, principal: Principal, prompt_ids: list[int], params: SamplingParams,
           adapter_key: Hashable | None, route: str) -> Request:
    """Queue the request on the engine; 503 while draining, 429 when one of the tenant's limits is
    reached or the queue is full (before any response starts: a stream is refused with a status)."""
    if not services.accepting:
        services.metrics.requests_rejected.labels("draining").inc()
        raise Unavailable("the server is shutting down; retry on another replica")
    tenant = principal.tenant
    ticket = services.limiter.admit(tenant, len(prompt_ids), params.max_new_tokens * params.n,
                                    lambda: services.engine.waiting.count(tenant))
    request = Request(prompt_ids, params, RequestStream(), adapter_key=adapter_key, label=route, tenant=tenant)
    try:
        services.engine.submit(request)
    except QueueFull:
        services.limiter.cancel(ticket)
        services.metrics.requests_rejected.labels("queue_full").inc()
        raise
    except BaseException:
        services.limiter.cancel(ticket)
        raise
    services.limiter.hold(request, ticket)
    return request


async def events(services: Services, request: Request, http: HttpRequest) -> AsyncIterator[Event]:
    """Token and finish events of `request`; an engine error is raised as ApiError.

    Leaving early (client gone, generator closed) cancels the request so the
    engine frees its batch slot at the next step.
    """
    engine = services.engine
    watcher = asyncio.create_task(_watch_disconnect(http, engine, request))
    finished = False
    remaining = request.params.n  # one finish event per sequence
    outcome = Outcome(time.perf_counter())
    try:
        while True:
            try:
                event = await asyncio.wait_for(request.stream.get(), ALIVE_CHECK_S)
            except asyncio.TimeoutError:
                if not engine.alive and not request.cancelled:
                    outcome.reason = "error"
                    raise Unavailable("the generation engine stopped") from None
                continue
            outcome.see(event)
            if isinstance(event, ErrorEvent):
                finished = True
                raise _as_api_error(event.error)
            if isinstance(event, FinishEvent):
                remaining -= 1
                finished = remaining == 0
                if finished:
                    services.metrics.requests.labels(request.label, event.finish_reason).inc()
            yield event
            if finished:
                return
    finally:
        watcher.cancel()
        services.limiter.release(request, len(request.prompt_ids) + outcome.generated)
        if not finished:  # the consumer went away (client disconnect): free the slot
            engine.cancel(request)
            services.metrics.requests.labels(request.label, "cancelled").inc()
        _observe(services, request, http, outcome)


@dataclass
class Outcome:
    """What one generation did, for per-adapter metrics and its log line."""

    started: float
    reason: str = "cancelled"  # until a finish or error event says otherwise
    first_token_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: int = 0  # tokens of all n sequences
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache

    def see(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            if self.first_token_s is None and event.token_ids:
                self.first_token_s = time.perf_counter() - self.started
            self.completion_tokens += len(event.token_ids)
            self.generated += len(event.token_ids)
        elif isinstance(event, FinishEvent):
            self.reason = event.finish_reason
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
            self.cached_tokens = max(self.cached_tokens, event.cached_tokens)  # n > 1: the first one reused
        elif isinstance(event, ErrorEvent):
            self.reason = "error"


def _adapter_id(key: Hashable | None) -> str | None:
    """The engine carries the key opaquely; the API put an AdapterKey (or None = base) in it."""
    if key is None:
        return None
    assert isinstance(key, AdapterKey), key
    return key.adapter_id


def _observe(services: Services, request: Request, http: HttpRequest, outcome: Outcome) -> None:
    """Per-adapter metrics and one log line; never raises (it runs while a request unwinds)."""
    try:
        principal = http.scope.get(PRINCIPAL_SCOPE_KEY)
        tenant = principal.tenant if principal is not None else DEFAULT_TENANT
        seconds = time.perf_counter() - outcome.started
        prompt_tokens = outcome.prompt_tokens or len(request.prompt_ids)
        services.metrics.observe_generation(tenant, _adapter_id(request.adapter_key), outcome.reason, prompt_tokens,
                                            outcome.completion_tokens, seconds, outcome.first_token_s,
                                            outcome.cached_tokens)
        prompt = None
        if services.settings.log_prompts:
            prompt = services.base.tokenizer.decode(request.prompt_ids)
        key = request.adapter_key
        log_generation(route=request.label, engine_request_id=request.request_id,
                       adapter="" if key is None else str(key), finish_reason=outcome.reason,
                       prompt_tokens=prompt_tokens, completion_tokens=outcome.completion_tokens,
                       seconds=seconds, prompt_text=prompt)
    except Exception:  # noqa: BLE001 - observability must never fail a request
        logging.getLogger(__name__).debug("observing a generation failed", exc_info=True)


async def _watch_disconnect(http: HttpRequest, engine, request: Request) -> None:
    with contextlib.suppress(Exception):
        while True:
            message = await http.receive()
            if message["type"] == "http.disconnect":
                engine.cancel(request)
                return


def _as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    return ApiError(f"generation failed: {type(error).__name__}", status=500, type="internal_error")


async def complete(services: Services, request: Request, http: HttpRequest) -> Completion:
    parts: list[str] = []
    async for event in events(services, request, http):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        elif isinstance(event, FinishEvent):
            return Completion("".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens)
    raise Unavailable("the generation ended without a result")
