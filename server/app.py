"""create_app and the lifespan that builds and tears down the services.

Start-up order: settings → base model → store → adapter layers injected →
merge registry → adapter manager → waiting queue → adapter service → training →
engine (given the training worker); the engine thread starts last. Shutdown: stop admitting
(503), drain in-flight requests (bounded by `drain_timeout_s`), stop the
engine, then run the services' shutdown hooks (e.g. persisting job state).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI

from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.limits import AdapterLimits
from server.adapters.residency.manager import AdapterManager
from server.adapters.residency.sizing import SlotPlan, bytes_per_slot_rank, plan_slots
from server.adapters.merge.merge import MergeRegistry
from server.adapters.service import AdapterService
from server.adapters.store.protocol import AdapterStorage
from server.adapters.store.store import open_store
from server.api.auth import install_auth
from server.api.errors import CatchAllMiddleware, install_error_handlers
from server.api.keys import ApiKeys
from server.api.quotas import TenantQuotas
from server.api.rate_limit import TenantLimiter
from server.api.http_protocol import json_h11_protocol
from server.api.responses import ERROR_RESPONSES
from server.api.limits import SizeLimitMiddleware
from server.api.prompts import PromptEncoder
from server.api.routes import adapters, generate, health, me, merge, openai, training, ui
from server.engine.engine import Engine
from server.engine.loop import EngineLoop
from server.engine.prefix_cache import pool_bytes
from server.engine.waiting import WaitingQueue
from server.engine.grammar import GrammarCompiler
from server.engine.kv_cache import KVCache
from server.logging import RequestIdMiddleware
from server.metrics import Metrics
from server.model.load import BaseModel, load_base
from server.api.services import Services
from server.settings import Settings
from server.training.job_protocol import JobQueue
from server.training.service import TrainingService

if TYPE_CHECKING:
    from server.adapters.store.object_store import S3Options

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05


def create_app(settings: Settings | None = None, base: BaseModel | None = None,
               keys: ApiKeys | None = None) -> FastAPI:
    """`base` lets tests share one loaded model between apps; production loads it in the lifespan.
    `keys`: the table the CLI loaded; None loads settings.api_keys here (tests, embedders)."""
    settings = settings or Settings()
    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.settings = settings
    app.state.preloaded_base = base
    app.state.services = None  # until the lifespan has built them
    app.state.freeze_gc = False  # the CLI's server process sets it (see lifespan)
    install_error_handlers(app)
    app.add_middleware(SizeLimitMiddleware, settings=settings)
    install_auth(app, settings, keys)  # no byte of an unauthenticated request is read
    app.add_middleware(CatchAllMiddleware)  # inside the request id: a 500 names it, the connection lives on
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer (401/413/431 too) carries X-Request-ID
    for module in (health, generate, openai, adapters, merge, training, me, ui):
        app.include_router(module.router)
    app.include_router(adapters.fallback_router)  # last: unmatched /v1/adapters/... paths → clean 4xx
    return app


def create_server_app(settings: Settings, keys: ApiKeys | None) -> FastAPI:
    """The app as a server process (the serve command, a cluster replica) runs it: the process's torch
    intra-op threads set from settings, its start-up objects frozen out of the collector's sight."""
    torch.set_num_threads(settings.torch_threads)  # process-wide: the engine thread's steps use it
    app = create_app(settings, keys=keys)
    app.state.freeze_gc = True  # this process is the server: its start-up objects never die (see lifespan)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    keys: ApiKeys | None = app.state.api_keys
    services = build_services(app.state.settings, app.state.preloaded_base, keys.quotas if keys else None)
    app.state.services = services
    if app.state.freeze_gc:
        # The model, tokenizer and every other start-up object live as long as the process, yet a
        # full (gen 2) collection walks them all, pausing adapter loads and engine steps
        # (bench/NOTES.md, "Start-up"). Freezing moves them out of the collector's sight; refcounting still frees.
        gc.collect()
        gc.freeze()
    services.engine.start()
    try:
        yield
    finally:
        await shutdown(services)


def build_services(settings: Settings, base: BaseModel | None = None, quotas: TenantQuotas | None = None) -> Services:
    """Construction order: each component gets its collaborators when it is built. `quotas`: the
    tenants' limits and shares from the API-keys file (None: none limited, all equal)."""
    base = base or load_base(settings)
    slots = slot_plan(settings, base)
    log.info(slots.describe())
    limits = AdapterLimits.from_settings(settings, resident=slots.slots)
    store = open_adapter_store(settings, base, limits)
    try:
        return _build_on(store, settings, base, limits, quotas or TenantQuotas())
    except BaseException:
        store.close()
        raise


def open_adapter_store(settings: Settings, base: BaseModel, limits: AdapterLimits) -> AdapterStorage:
    """The local directory (StoreInUse: another server has it), or the shared bucket (StoreUnavailable:
    it does not answer), whose downloads this server caches under `settings.store`."""
    if settings.s3_store is None:
        grace = settings.shared_gc_grace_s if settings.clustered else None  # replicas share the directory
        return open_store(settings.store, base, limits, shared_grace_s=grace)
    from server.adapters.store.s3_store import open_s3_store  # boto3: the optional `s3` extra

    return open_s3_store(s3_options(settings), settings.store, settings.s3_cache_bytes)


def s3_options(settings: Settings) -> S3Options:
    """The bucket settings as the S3 store takes them (with settings.s3_store set)."""
    from server.adapters.store.object_store import S3Location, S3Options

    return S3Options(S3Location.parse(settings.s3_store or ""), settings.s3_endpoint_url, settings.s3_region,
                     settings.s3_timeout_s, settings.s3_max_attempts)


def open_job_queue(settings: Settings) -> JobQueue:
    """With --s3-store the job queue lives in the bucket too: servers on other machines share it
    (server/training/s3_jobs.py). Without, TrainingService opens the SQLite one in `settings.store`."""
    from server.adapters.store.object_store import ObjectStore
    from server.training.s3_jobs import S3JobQueue

    return S3JobQueue(ObjectStore(s3_options(settings)), uuid.uuid4().hex, settings.train_lease_s,
                      settings.train_clock_skew_s, settings.train_max_attempts)


def _build_on(store: AdapterStorage, settings: Settings, base: BaseModel, limits: AdapterLimits,
              quotas: TenantQuotas) -> Services:
    metrics = Metrics(settings.metrics_max_adapter_series)
    loop = EngineLoop()
    layers = inject_adapter_layers(base.model, limits)  # adapter-aware layers swapped into the base model
    # Dedicated adapters run on merged copies, swapped in by the engine loop between steps.
    merge = MergeRegistry(base, layers, store, limits, metrics, loop)
    adapters = AdapterManager(base, layers, store, limits, metrics, merge)
    # Built before the engine: the adapter service asks it which versions queued requests wait for,
    # and the training worker the engine is given publishes through that service.
    waiting = WaitingQueue(settings.max_queue)
    adapter_service = AdapterService(base, store, limits, adapters, merge, queue=waiting,
                                     keep_uploads=settings.prefetch_adapters)
    training = TrainingService(settings, base, adapter_service, loop,  # trains through the adapter layers
                               queue=open_job_queue(settings) if settings.s3_store is not None else None)
    engine = Engine(base, settings, metrics, placement=adapters, loop=loop, waiting=waiting,
                    background=training.worker, shares=quotas)
    prompts = PromptEncoder(base.tokenizer, base.max_context, settings.tokenize_workers)
    grammars = GrammarCompiler(base.tokenizer, engine.vocab, engine.eos_ids, cache_size=settings.grammar_cache_size,
                               timeout_s=settings.grammar_compile_timeout_s,
                               max_source_chars=settings.max_grammar_chars)
    services = Services(settings=settings, base=base, engine=engine, metrics=metrics, prompts=prompts,
                        grammars=grammars, store=store, adapters=adapters, merge=merge,
                        adapter_service=adapter_service, jobs=training,
                        limiter=TenantLimiter(quotas, metrics))
    # Hooks run in this order; the store last: every other hook may still write to it.
    for hook in (prompts.close, grammars.close, adapters.close, merge.close, training.close, store.close):
        services.add_shutdown_hook(hook)
    adapter_service.start()  # warm the host tier, rebuild dedicated adapters' merged copies
    return services


def slot_plan(settings: Settings, base: BaseModel) -> SlotPlan:
    """Device slots per adapted module; `auto` on a GPU is capped by the memory left once the model is
    loaded and the KV cache (sized here on the meta device: nothing allocated) is taken."""
    slot_dtype = base.dtype if settings.slot_dtype == "auto" else settings.slot_torch_dtype
    free = torch.cuda.mem_get_info(base.device)[0] if base.device.type == "cuda" else None
    return plan_slots(settings.max_adapters_resident, max_batch=settings.max_batch, max_rank=settings.max_rank,
                      bytes_per_rank=bytes_per_slot_rank(base.model, slot_dtype.itemsize),
                      free_device_bytes=free, reserved_bytes=device_reserve(settings, base),
                      fraction=settings.slot_memory_fraction)


def device_reserve(settings: Settings, base: BaseModel) -> int:
    """Device bytes taken before adapter slots: the KV rows, the prefix-cache pool, and the budget of the
    whole-module copy pool (modules_to_save; allocated at the first such adapter, up to this budget)."""
    return kv_reserve(settings, base) + settings.module_copy_budget_mb * 2**20


def kv_reserve(settings: Settings, base: BaseModel) -> int:
    """Device bytes the engine takes for KV: its rows and the prefix-cache pool (sized on the meta device)."""
    kv = KVCache.for_model(base.model.config, settings.max_batch, base.max_context, torch.device("meta"),
                           base.dtype)
    return kv.nbytes() + pool_bytes(kv, settings.prefix_cache_tokens)


async def drain(services: Services, timeout: float) -> bool:
    """Stop admitting and wait (bounded) until no request is queued or running."""
    services.accepting = False
    deadline = time.monotonic() + timeout
    while not services.engine.idle() and services.engine.alive:
        if time.monotonic() >= deadline:
            log.warning("drain timeout: %s", services.engine.stats())
            return False
        await asyncio.sleep(DRAIN_POLL_S)
    return True


async def shutdown(services: Services) -> None:
    await drain(services, services.settings.drain_timeout_s)
    await asyncio.to_thread(services.engine.stop)
    await asyncio.to_thread(services.run_shutdown_hooks)


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn options matching our limits: h11 must let headers through to the 431 check; our h11
    protocol answers malformed HTTP in JSON and gives each request head a deadline."""
    return {
        "http": json_h11_protocol(settings.header_timeout_s),
        "h11_max_incomplete_event_size": max(4 * settings.max_header_bytes, 64 * 1024),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": int(settings.drain_timeout_s) + 5,
    }
