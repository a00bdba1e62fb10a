"""Errors that name the field, in FastAPI's own 422 shape (`{"detail": [{"loc", "msg", "type"}]}`)."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

# Redis holds the job records and the queue: without it no request that touches a job can be served.
STORE_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError)


def invalid(field: str, msg: str, value: Any = None, *, where: str = "body") -> RequestValidationError:
    """A 422 for one field; `field` may be dotted (`adapters.0.name`) and is repeated at the start of `msg`."""
    loc = (where, *[int(p) if p.isdigit() else p for p in field.split(".")])
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": f"{field}: {msg}", "input": value}])


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def conflict(what: str) -> HTTPException:
    return HTTPException(status_code=409, detail=what)


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with the reason (not a bare 500) while Redis is unreachable."""
    return JSONResponse({"detail": f"the job store (Redis) is unreachable, try again later: {exc}"},
                        status_code=503, headers={"Retry-After": "5"})
