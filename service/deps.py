"""FastAPI dependencies as `Annotated` aliases, so routes stay short.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its threadpool, one thread hop per
dependency per request (~0.3 ms each on a busy 2-core host); these only read what the app built at startup.
"""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from jobs.keys import Principal
from jobs.store import JobStore
from jobs.volume import Volume
from service.events import EventHub
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


async def _principal(request: Request) -> Principal:
    """The key behind the request (401 without a valid one in keys mode), counted against its rate limit."""
    auth = request.app.state.auth
    principal = await auth.principal(request)
    await auth.rate_limit(request, principal)
    return principal


async def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.admin:
        raise HTTPException(403, "this needs an admin key")
    return principal


async def _hub(request: Request) -> EventHub:
    return request.app.state.hub


async def _volume(request: Request) -> Volume:
    return request.app.state.volume


SettingsDep = Annotated[ApiSettings, Depends(_settings)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
AdminDep = Annotated[Principal, Depends(_admin)]
VolumeDep = Annotated[Volume, Depends(_volume)]
# a route that other routes also call as a function, without it (`= None`); over HTTP it is always given
MaybeVolumeDep = Annotated[Volume | None, Depends(_volume)]
HubDep = Annotated[EventHub, Depends(_hub)]
StoreDep = Annotated[JobStore, Depends(_store)]
QueueDep = Annotated[Celery, Depends(_queue)]
AsyncRedisDep = Annotated[aioredis.Redis, Depends(_aredis)]
ModelInfoDep = Annotated[ModelInfo, Depends(_model_info)]
