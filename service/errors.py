"""Errors that name the field, in FastAPI's own 422 shape (`{"detail": [{"loc", "msg", "type"}]}`)."""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

from jobs.requests import api_name
from minidalle.errors import InvalidInput

log = logging.getLogger(__name__)
# Redis holds the job records and the queue: without it no request that touches a job can be served.
STORE_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError)


def invalid(field: str, msg: str, value: Any = None, *, where: str = "body") -> RequestValidationError:
    """A 422 for one field; `field` may be dotted (`adapters.0.name`) and is repeated at the start of `msg`."""
    loc = (where, *[int(p) if p.isdigit() else p for p in field.split(".")])
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": f"{field}: {msg}", "input": value}])


async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
    """A library / contract InvalidInput raised while handling a request: a 422 naming its field (the API's name)."""
    assert isinstance(exc, InvalidInput)  # registered for that class only
    return await validation_failed(request, invalid(api_name(exc.field), exc.message))


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def conflict(what: str) -> HTTPException:
    return HTTPException(status_code=409, detail=what)


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with the reason (not a bare 500) while Redis is unreachable; the details (addresses) go to the log."""
    log.warning("%s %s: Redis unreachable: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "the job store (Redis) is unreachable, try again later"},
                        status_code=503, headers={"Retry-After": "5"})


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf': JSON has no such numbers
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def validation_failed(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 body, except that a NaN or Infinity the client sent is echoed as a string (FastAPI's
    handler would fail to render it and answer 500)."""
    assert isinstance(exc, RequestValidationError)  # registered for that class only
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)
