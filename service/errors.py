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
    parts = [] if field == where else [int(p) if p.isdigit() else p for p in field.split(".")]
    loc = (where, *parts)
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


ECHO_CHARS = 200  # a 422 shows at most this much of what was sent


def _echoable(value: Any, depth: int = 0) -> Any:
    """What the client sent, made safe to echo: NaN/Infinity as text (JSON has no such numbers), lone surrogates
    replaced (they can't be encoded), long strings and deep or wide structures cut."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        text = value.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
        return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"… ({len(value)} characters)"
    if depth >= 3 and isinstance(value, dict | list | tuple):
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {_echoable(str(k), depth + 1): _echoable(v, depth + 1) for k, v in items[:20]}
        return out if len(items) <= 20 else {**out, "…": f"{len(items) - 20} more"}
    if isinstance(value, list | tuple):
        return [_echoable(v, depth + 1) for v in value[:20]] + ([f"… {len(value) - 20} more"] if len(value) > 20
                                                                 else [])
    return value


async def validation_failed(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 body, made safe to render: no NaN, no lone surrogate, nothing large echoed back (FastAPI's
    own handler would answer 500 for the first two and repeat a megabyte for the last)."""
    assert isinstance(exc, RequestValidationError)  # registered for that class only
    errors = [{**e, "input": _echoable(e.get("input")), "msg": _echoable(e.get("msg", ""))} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


async def too_deep(request: Request, exc: Exception) -> JSONResponse:
    """JSON nested deeper than the parser recurses: a 422 for the body, not a crash."""
    return await validation_failed(request, invalid("body", "nested too deeply"))


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Anything else: logged with its traceback; the client learns nothing internal (paths, hosts)."""
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": "internal error; the operator's log has the details"}, status_code=500)
