"""Pure ASGI middlewares (no BaseHTTPMiddleware: it would buffer the event streams)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

Scope = dict
ASGIApp = Callable


class BodySizeLimit:
    """413 for a request body above the limit of its path: checked against Content-Length first, then counted
    while the body streams in (a chunked upload has no Content-Length), so an oversized upload is never kept."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]):
        self.app = app
        self.limit_for = limit_for  # (path, content type) -> bytes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit = self.limit_for(scope["path"], headers.get(b"content-type", b"").decode("latin-1"))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_413(send, limit)

        received = 0
        too_large = False
        started = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:  # the app turned the aborted body into some error; answer 413 instead
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_413(send, limit)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _send_413(send, limit)


class _TooLarge(Exception):
    pass


async def _send_413(send, limit: int) -> None:
    body = json.dumps({"detail": f"file: the request body is larger than the {limit}-byte limit"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class JsonOnly:
    """415 for a request body that is not JSON (multipart too on upload paths). A browser page of another origin
    can send a "simple" request (text/plain, form-encoded) without asking first; this refuses those outright, so
    JSON endpoints can't be driven by someone else's page even before keys are checked."""

    def __init__(self, app: ASGIApp, multipart_paths: tuple[str, ...]):
        self.app = app
        self.multipart_paths = multipart_paths

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        allowed = {b"application/json"} | ({b"multipart/form-data"} if scope["path"] in self.multipart_paths else set())
        if has_body and kind not in allowed:
            body = json.dumps({"detail": "content-type: send " + " or ".join(sorted(a.decode() for a in allowed))
                               + f", not {kind.decode('latin-1')[:60] or 'nothing'}"}).encode()
            await send({"type": "http.response.start", "status": 415,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Counts requests and their durations by method, route template and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("minidalle_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=registry)
        self.latency = Histogram("minidalle_http_request_duration_seconds", "HTTP request duration (until the "
                                 "response ends; event streams count their whole life)", ["method", "route"],
                                 registry=registry)

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(scope["method"], path).observe(time.perf_counter() - t0)
