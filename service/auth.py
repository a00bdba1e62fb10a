"""Who is asking and how fast they may ask: API keys (`jobs.keys`) and a per-key rate limit (`limits`, on Redis).

`Authorization: Bearer <key>` names the key (or HTTP Basic with the key as its password, which is how A1111 clients
send `--api-auth` credentials). With `MINIDALLE_AUTH=keys` a request without one is a 401; with
`open` it acts as the built-in admin `anonymous`. A known key is cached for a few seconds (a revoked key stops
working within `CACHE_S`), so a request costs no Redis round trip for its key most of the time.

Every keyed request counts against its key's requests per minute (a sliding window in Redis, shared by every API
replica); answers carry `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until a
request is free again), and a request over the limit is a 429 with `Retry-After`.
"""

from __future__ import annotations

import base64
import math
import time

from fastapi import HTTPException, Request
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import BlockingConnectionPool

from jobs.keys import ANONYMOUS, Limits, Principal, authenticate_async, digest
from service.settings import ApiSettings

CACHE_S = 5.0


class Auth:
    def __init__(self, settings: ApiSettings, aredis):
        self.settings, self.aredis = settings, aredis
        self.defaults = Limits(requests_per_minute=settings.key_requests_per_minute,
                               concurrent_jobs=settings.key_concurrent_jobs,
                               queued_seconds=settings.key_queued_seconds, disk_bytes=settings.key_disk_bytes,
                               upload_bytes=settings.max_upload_bytes)
        # its own bounded pool: a flood waits for a connection instead of failing with "too many connections"
        pool = BlockingConnectionPool.from_url(settings.broker_url, max_connections=32, timeout=10,
                                               socket_connect_timeout=5)
        storage = RedisStorage("async+" + settings.broker_url, implementation="redispy", key_prefix="minidalle:rate",
                               connection_pool=pool)  # type: ignore[arg-type]  # passed on to redis-py
        # a sliding window of two counters: O(1) per request whatever the limit (a moving window keeps a
        # timestamp per request, which a generous limit makes long)
        self.limiter = SlidingWindowCounterRateLimiter(storage)
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if header is None:
            if self.settings.auth == "open":
                return ANONYMOUS
            raise _unauthorized("an API key is required: send `Authorization: Bearer <key>`")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "basic":  # A1111's --api-auth: clients send user:password; the password is the key
            token = _basic_password(token)
        elif scheme.lower() != "bearer":
            token = ""
        if not token.strip():
            raise _unauthorized("send the API key as `Authorization: Bearer <key>` (or as the password of HTTP Basic)")
        principal = await self._lookup(token.strip())
        if principal is None:
            raise _unauthorized("unknown or revoked API key")
        principal.limits = principal.limits.merged(self.defaults)
        return principal

    async def _lookup(self, token: str) -> Principal | None:
        token_hash = digest(token)
        hit = self._cache.get(token_hash)
        if hit is not None and hit[1] > time.monotonic():
            return Principal(hit[0].id, hit[0].name, hit[0].admin, hit[0].limits)
        principal = await authenticate_async(self.aredis, token)
        if principal is not None:
            if len(self._cache) > 10_000:  # many distinct keys: start over rather than grow without bound
                self._cache.clear()
            self._cache[token_hash] = (principal, time.monotonic() + CACHE_S)
        return principal

    async def rate_limit(self, request: Request, principal: Principal) -> None:
        """Count this request against the key's requests per minute; 429 past it. The anonymous admin of open
        mode (one trusted user on loopback) is not limited."""
        if principal.anonymous:
            return
        per_minute = principal.limits.requests_per_minute or self.settings.key_requests_per_minute
        item = RateLimitItemPerMinute(per_minute)
        allowed = await self.limiter.hit(item, principal.id)
        stats = await self.limiter.get_window_stats(item, principal.id)
        reset_s = max(0, math.ceil(stats.reset_time - time.time()))
        request.state.ratelimit = {"X-RateLimit-Limit": str(per_minute),
                                   "X-RateLimit-Remaining": str(max(0, stats.remaining)),
                                   "X-RateLimit-Reset": str(reset_s)}
        if not allowed:
            raise HTTPException(429, f"rate limit: at most {per_minute} requests per minute for this key",
                                headers={"Retry-After": str(max(1, reset_s)), **request.state.ratelimit})


def _basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials (base64 of `user:password`); empty when they are malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


class RateLimitHeaders:
    """Pure ASGI: adds the rate-limit headers a request's key was given (see `Auth.rate_limit`) to its answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                extra = (scope.get("state") or {}).get("ratelimit")
                if extra:
                    have = {k.lower() for k, _ in message.get("headers", [])}
                    message = {**message, "headers": [*message.get("headers", []),
                                                      *[(k.lower().encode(), v.encode()) for k, v in extra.items()
                                                        if k.lower().encode() not in have]]}
            await send(message)

        await self.app(scope, receive, with_headers)
