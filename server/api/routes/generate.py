"""Route: POST /generate (plain JSON or SSE). Work happens in the engine."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api import generation as gen
from server.api.deps import Principal, get_principal
from server.api.responses import SSE
from server.api.schemas import GenerateRequest, GenerateResponse, Usage, normalize_stop
from server.engine.request import FinishEvent, Request as EngineRequest, SamplingParams, TokenEvent
from server.errors import ApiError
from server.services import Services, get_services

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": SSE}})
async def generate(body: GenerateRequest, request: Request,
                   principal: Principal = Depends(get_principal)):
    services = get_services(request)
    params = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=body.seed, stop=normalize_stop(body.stop))
    prompt_ids = await gen.encode_prompt(services, body.prompt)
    gen.check_request(services, prompt_ids, params)
    key = await gen.resolve_adapter(services, principal, body.adapter_id)
    job = gen.submit(services, prompt_ids, params, key, "generate")
    if body.stream:
        return StreamingResponse(_sse(services, job, request, body.adapter_id), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    done = await gen.complete(services, job, request)
    return GenerateResponse(id=job.request_id, adapter_id=body.adapter_id, text=done.text,
                            finish_reason=done.finish_reason,  # type: ignore[arg-type]
                            usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens))


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(services: Services, job: EngineRequest, request: Request,
               adapter_id: str | None) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(gen.events(services, job, request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield sse({"text": event.text})
                elif isinstance(event, FinishEvent):
                    yield sse({"id": job.request_id, "adapter_id": adapter_id, "finish_reason": event.finish_reason,
                               "usage": {"prompt_tokens": event.prompt_tokens,
                                         "completion_tokens": event.completion_tokens}})
    except ApiError as exc:
        yield sse({"error": {"type": exc.type, "message": exc.message}})
    yield "data: [DONE]\n\n"
