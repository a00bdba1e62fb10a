"""The FastAPI app: `uvicorn service.main:app`. Never imports torch (checked by import-linter and by
tests/service/test_api_no_torch.py)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from jobs.queue import make_app
from jobs.store import JobStore, blocking_client
from minidalle.errors import InvalidInput
from service.errors import STORE_DOWN, invalid_input, store_unavailable, validation_failed
from service.middleware import BodySizeLimit, RequestMetrics
from service.model_info import get_model_info
from service.routes import datasets, files, finetune, generate, health, jobs
from service.settings import ApiSettings, get_settings

log = logging.getLogger(__name__)
DESCRIPTION = """Text-to-image generation and LoRA fine-tuning on a queue of GPU workers.

Every job is asynchronous: `POST /generate` or `POST /finetune` answers `202` with links; follow
`GET /jobs/{id}/events` (Server-Sent Events) or poll `GET /jobs/{id}`. `POST /generate?wait=30` answers with the
finished job when it ends within 30 s.
"""
UPLOAD_PATHS = ("/datasets", "/finetune")
JSON_BODY_LIMIT = 1 << 20  # a generate request is a few hundred bytes


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:  # tokenizer and model configs now, so the first request does not pay for them
            app.state.model_info = await run_in_threadpool(get_model_info, settings.model)
        except Exception:  # /generate will report it; /healthz must still answer
            log.exception("could not read model %r", settings.model or "(embedded)")
        yield
        await app.state.aredis.aclose()
        app.state.store.r.close()

    app = FastAPIOffline(title="minidalle", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.model_info = None  # read by the lifespan, or by the first request that needs it
    app.state.store = JobStore.from_settings(settings)
    app.state.queue = make_app(settings)  # producer only: tasks are sent by name
    app.state.aredis = blocking_client(settings.broker_url, asyncio=True)  # SSE: XREAD BLOCK of sse_ping_s
    app.state.registry = CollectorRegistry()
    app.state.registry.register(health.QueueCollector(app.state.store))
    for module in (generate, finetune, datasets, jobs, files, health):
        app.include_router(module.router)
    for exc in STORE_DOWN:
        app.add_exception_handler(exc, store_unavailable)
    app.add_exception_handler(RequestValidationError, validation_failed)
    app.add_exception_handler(InvalidInput, invalid_input)

    upload_limit = settings.max_upload_bytes + (1 << 20)  # multipart framing and the other form fields

    def limit_for(path: str) -> int:
        return upload_limit if path in UPLOAD_PATHS else JSON_BODY_LIMIT

    app.add_middleware(BodySizeLimit, limit_for=limit_for)
    app.add_middleware(RequestMetrics, registry=app.state.registry)
    return app


app = create_app()
