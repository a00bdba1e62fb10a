"""FastAPI dependencies as `Annotated` aliases, so routes stay short."""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from service.model_info import ModelInfo, get_model_info
from service.settings import ApiSettings, get_settings
from worker.jobs import JobStore


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _aredis(request: Request) -> aioredis.Redis:
    return request.app.state.aredis


def _model_info(settings: Annotated[ApiSettings, Depends(get_settings)]) -> ModelInfo:
    return get_model_info(settings.model)


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
AsyncRedisDep = Annotated[aioredis.Redis, Depends(_aredis)]
ModelInfoDep = Annotated[ModelInfo, Depends(_model_info)]
