"""FastAPI dependencies as `Annotated` aliases, so routes stay short.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its threadpool, one thread hop per
dependency per request (~0.3 ms each on a busy 2-core host); these only read what the app built at startup.
"""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from jobs.store import JobStore
from service.model_info import ModelInfo, get_model_info
from service.settings import ApiSettings


async def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


async def _store(request: Request) -> JobStore:
    return request.app.state.store


async def _queue(request: Request) -> Celery:
    return request.app.state.queue


async def _aredis(request: Request) -> aioredis.Redis:
    return request.app.state.aredis


async def _model_info(request: Request, settings: Annotated[ApiSettings, Depends(_settings)]) -> ModelInfo:
    info = getattr(request.app.state, "model_info", None)  # read at startup (service.main's lifespan)
    if info is None:  # that failed (e.g. a hub download): try again, off the event loop
        info = request.app.state.model_info = await run_in_threadpool(get_model_info, settings.model)
    return info


SettingsDep = Annotated[ApiSettings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
QueueDep = Annotated[Celery, Depends(_queue)]
AsyncRedisDep = Annotated[aioredis.Redis, Depends(_aredis)]
ModelInfoDep = Annotated[ModelInfo, Depends(_model_info)]
