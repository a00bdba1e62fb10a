"""Errors that name the field, in FastAPI's own 422 shape (`{"detail": [{"loc", "msg", "type"}]}`)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError


def invalid(field: str, msg: str, value: Any = None, *, where: str = "body") -> RequestValidationError:
    """A 422 for one field; `field` may be dotted (`adapters.0.name`) and is repeated at the start of `msg`."""
    loc = (where, *[int(p) if p.isdigit() else p for p in field.split(".")])
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": f"{field}: {msg}", "input": value}])


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def conflict(what: str) -> HTTPException:
    return HTTPException(status_code=409, detail=what)
