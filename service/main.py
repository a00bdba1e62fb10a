"""The FastAPI app: `uvicorn service.main:app`. Never imports torch (checked by import-linter and by
tests/service/test_api_no_torch.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from jobs.keys import KeyStore
from jobs.queue import make_app
from jobs.store import JobStore
from jobs.volume import Volume
from minidalle.errors import InvalidInput
from service.auth import Auth, RateLimitHeaders
from service.errors import STORE_DOWN, invalid_input, store_unavailable, too_deep, unexpected, validation_failed
from service.events import EventHub, short_command_client
from service.middleware import BodySizeLimit, JsonOnly, RequestMetrics
from service.model_info import get_model_info
from service.openapi import install as install_openapi
from service.routes import a1111, account, datasets, files, finetune, generate, health, jobs, page, variations
from service.settings import ApiSettings, get_settings

log = logging.getLogger(__name__)
DESCRIPTION = """Text-to-image generation and LoRA fine-tuning on a queue of GPU workers.

Every job is asynchronous: `POST /generate` or `POST /finetune` answers `202` with links; follow
`GET /jobs/{id}/events` (Server-Sent Events) or poll `GET /jobs/{id}`. `POST /generate?wait=30` answers with the
finished job when it ends within 30 s.
"""
UPLOAD_PATHS = ("/datasets", "/finetune", "/adapters", "/variations")
JSON_BODY_LIMIT = 1 << 20  # a generate request is a few hundred bytes


def warm_queue(queue) -> None:
    """Connect the queue's producer now: the first connection costs tens of ms, which the first request (maybe
    one of a burst) should not pay."""
    with queue.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.admin_key is not None:  # a deployment's first admin key, from its environment
            try:
                await run_in_threadpool(KeyStore(app.state.store.r).ensure, settings.admin_key.get_secret_value(),
                                        "admin", admin=True)
            except STORE_DOWN:  # Redis not up yet: the first request with that key creates it (service.auth)
                log.warning("could not record MINIDALLE_ADMIN_KEY yet (Redis unreachable)")
        try:  # tokenizer and model configs now, so the first request does not pay for them
            app.state.model_info = await run_in_threadpool(get_model_info, settings.model)
            await run_in_threadpool(warm_queue, app.state.queue)
            # what start-up made (FastAPI, pydantic, transformers' modules) lives as long as the process: out of the
            # collector's way, so a full collection during a burst of requests takes milliseconds, not ~100 ms
            gc.freeze()
        except Exception:  # /generate will report it; /healthz must still answer
            log.exception("could not read model %r", settings.model or "(embedded)")
        yield
        await app.state.hub.close()
        await app.state.aredis.aclose()
        app.state.store.r.close()

    app = FastAPIOffline(title="minidalle", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.model_info = None  # read by the lifespan, or by the first request that needs it
    app.state.store = JobStore.from_settings(settings)
    app.state.queue = make_app(settings)  # producer only: tasks are sent by name
    # short commands only (auth, event history): bounded, waits for a free connection rather than opening more
    app.state.aredis = short_command_client(settings.broker_url)
    app.state.hub = EventHub(settings.broker_url, app.state.aredis, per_owner=settings.key_event_streams)
    app.state.auth = Auth(settings, app.state.aredis)
    app.state.volume = Volume(settings.data_dir)
    # concurrent submissions doing blocking work (tokenizer, Redis, the queue) in the threadpool: more only make
    # threads fight for the interpreter while /healthz and every other route wait
    app.state.submit_slots = asyncio.Semaphore(2)
    app.state.registry = CollectorRegistry()
    app.state.registry.register(health.QueueCollector(app.state.store))
    for module in (generate, variations, finetune, datasets, jobs, files, account, health, a1111, page):
        app.include_router(module.router)
    install_openapi(app)  # every error answer with its body, every file answer binary
    for exc in STORE_DOWN:
        app.add_exception_handler(exc, store_unavailable)
    app.add_exception_handler(RequestValidationError, validation_failed)
    app.add_exception_handler(InvalidInput, invalid_input)
    app.add_exception_handler(RecursionError, too_deep)
    app.add_exception_handler(Exception, unexpected)

    upload_limit = settings.max_upload_bytes + (1 << 20)  # multipart framing and the other form fields

    def limit_for(path: str, content_type: str) -> int:
        multipart = content_type.startswith("multipart/form-data")
        return upload_limit if path in UPLOAD_PATHS and multipart else JSON_BODY_LIMIT

    app.add_middleware(RateLimitHeaders)
    app.add_middleware(JsonOnly, multipart_paths=UPLOAD_PATHS)
    app.add_middleware(BodySizeLimit, limit_for=limit_for)
    if settings.cors_origins:  # off unless configured: browsers of other origins get no answer they may read
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                           expose_headers=["Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                                           "X-RateLimit-Reset"])
    app.add_middleware(RequestMetrics, registry=app.state.registry)
    return app


app = create_app()
