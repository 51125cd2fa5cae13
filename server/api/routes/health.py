"""Routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.deps import Principal, get_principal
from server.api.responses import PROMETHEUS, Health, NotReady, Ready
from server.api.services import get_services

router = APIRouter()


@router.get("/health", response_model=Health)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={200: {"model": Ready}, 503: {"model": NotReady}})
async def ready(request: Request) -> JSONResponse:
    services = request.app.state.services
    if services is None:
        return _not_ready("starting")
    if not services.engine.alive:
        return _not_ready("the generation engine is not running")
    if not services.accepting:
        return _not_ready("shutting down")
    return JSONResponse({"ready": True, "model": services.base.model_id})


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse({"ready": False, "reason": reason}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", responses=PROMETHEUS)
async def metrics(request: Request, principal: Principal = Depends(get_principal)) -> Response:
    """Admins (and dev mode, a single tenant) see every series; other keys only their own tenant's."""
    services = get_services(request)
    services.metrics.queue_depth.set(len(services.engine.waiting))
    services.metrics.running.set(len(services.engine.scheduler.running))
    everything = principal.admin or services.settings.api_keys is None
    body = services.metrics.render(services, None if everything else principal.tenant)
    return Response(body, media_type=services.metrics.content_type)
