"""Job events for every listener of this API process through one Redis connection: the event hub.

Each SSE stream (`GET /jobs/{id}/events`) and each `POST /generate?wait=` is a `Listener`. A single reader task
blocks on one `XREAD` over the streams somebody listens to, and hands each entry to their listeners' queues; a new
stream interrupts the blocked read (`CLIENT UNBLOCK`) so it is read at once. A listener first reads what it missed
(`XRANGE` on the shared pool, not blocking) and then takes live entries, dropping ids it has already seen, so
nothing is lost or repeated between the two. A thousand listeners cost one blocking connection, not a thousand; a
key may hold `key_event_streams` at once (beyond: 429). A listener that falls behind (its queue is full) is not
waited for: it catches up from Redis by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException
from redis import asyncio as aioredis

from jobs.store import TERMINAL, events_key, job_key, reconnecting

log = logging.getLogger(__name__)
QUEUE_SIZE = 2000  # entries a listener may lag behind before it re-reads from Redis instead
BLOCK_MS = 5000  # the reader's XREAD timeout: it is woken early whenever a stream is added


def short_command_client(url: str, max_connections: int = 64) -> aioredis.Redis:
    """The API's client for short commands (auth, event history, job records): a bounded pool that makes a request
    wait for a free connection rather than open more (blocking reads go through the hub's one connection)."""
    return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=True, max_connections=max_connections, timeout=10, socket_connect_timeout=5,
        socket_keepalive=True, health_check_interval=30, **reconnecting(asyncio=True)))


def _newer(a: str, b: str) -> bool:
    """Stream ids compare as (milliseconds, sequence)."""
    ma, _, sa = a.partition("-")
    mb, _, sb = b.partition("-")
    return (int(ma), int(sa or 0)) > (int(mb), int(sb or 0))


class Listener:
    def __init__(self, hub: EventHub, job_id: str, last: str):
        self.hub, self.job_id, self.key, self.last = hub, job_id, events_key(job_id), last
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue(QUEUE_SIZE)
        self.lagged = False
        self.owner = ""
        self.closed = False

    def offer(self, entry: tuple[str, dict]) -> None:
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.lagged = True  # re-read from Redis when the queue is drained

    async def events(self, idle_s: float) -> AsyncIterator[tuple[str, dict] | None]:
        """(id, fields) in order from after `last`, until a final event; None after `idle_s` without one (the
        caller pings, or gives up). Ends early if the job's record expired."""
        for entry in await self._missed():
            yield entry
            if entry[1].get("type") in TERMINAL:
                return
        while True:
            if self.lagged and self.queue.empty():
                self.lagged = False
                for entry in await self._missed():
                    yield entry
                    if entry[1].get("type") in TERMINAL:
                        return
            try:
                entry = await asyncio.wait_for(self.queue.get(), idle_s)
            except TimeoutError:
                if not await self.hub.pool.exists(job_key(self.job_id)):  # expired while we listened
                    return
                yield None
                continue
            if not _newer(entry[0], self.last):
                continue  # already read from Redis directly
            self.last = entry[0]
            yield entry
            if entry[1].get("type") in TERMINAL:
                return

    async def _missed(self) -> list[tuple[str, dict]]:
        start = "(" + self.last if self.last != "0" else "-"
        entries = await self.hub.pool.xrange(self.key, start, "+", count=10_000)
        if entries:
            self.last = entries[-1][0]
        return entries


class EventHub:
    def __init__(self, url: str, pool: aioredis.Redis, *, per_owner: int):
        self.url, self.per_owner = url, per_owner
        self.pool: Any = pool  # decode_responses=True: str replies (redis-py's types say bytes | str)
        self._listeners: dict[str, set[Listener]] = defaultdict(set)
        self._cursor: dict[str, str] = {}  # per stream: the last id the reader asked past
        self._owners: dict[str, int] = defaultdict(int)
        self._reader: asyncio.Task | None = None
        self._conn: Any = None  # the reader's own connection
        self._conn_id: int | None = None
        self._wake = asyncio.Event()

    @contextlib.asynccontextmanager
    async def listen(self, job_id: str, last: str, owner: str) -> AsyncIterator[Listener]:
        """A listener for the block (429 past the owner's cap); it gets every entry after `last`."""
        listener = await self.open(job_id, last, owner)
        try:
            yield listener
        finally:
            self.release(listener)

    async def open(self, job_id: str, last: str, owner: str) -> Listener:
        """Register a listener (429 past the owner's cap); `release` it when done (idempotent)."""
        if self._owners[owner] >= self.per_owner:
            raise HTTPException(429, f"this key has {self._owners[owner]} event streams open, its limit; close one "
                                "first", headers={"Retry-After": "5"})
        listener = Listener(self, job_id, last)
        listener.owner = owner
        self._owners[owner] += 1
        new = listener.key not in self._listeners
        self._listeners[listener.key].add(listener)
        if new:
            self._cursor[listener.key] = last if last != "0" else "0-0"
            await self._interrupt()
        self._start()
        return listener

    def release(self, listener: Listener) -> None:
        if listener.closed:
            return
        listener.closed = True
        self._owners[listener.owner] -= 1
        subs = self._listeners.get(listener.key)
        if subs is not None:
            subs.discard(listener)
            if not subs:
                del self._listeners[listener.key]
                self._cursor.pop(listener.key, None)

    def _start(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="event-hub")

    async def _interrupt(self) -> None:
        """Wake the reader out of its blocked XREAD, so the new stream is read now."""
        self._wake.set()
        if self._conn_id is not None:
            with contextlib.suppress(Exception):
                await self.pool.client_unblock(self._conn_id)

    async def _read_loop(self) -> None:
        while True:
            if not self._listeners:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 60)
                except TimeoutError:
                    if not self._listeners:
                        return await self.close_reader()
                continue
            try:
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: listeners see no news meanwhile; try again shortly
                log.warning("event hub: reading streams failed", exc_info=True)
                await self.close_reader()
                await asyncio.sleep(1)

    async def _read_once(self) -> None:
        if self._conn is None:
            self._conn = aioredis.Redis.from_url(self.url, decode_responses=True, single_connection_client=True,
                                                 socket_timeout=None, socket_connect_timeout=5, socket_keepalive=True)
            self._conn_id = await self._conn.client_id()
        streams = dict(self._cursor)
        self._wake.clear()
        reply = await self._conn.xread(streams, block=BLOCK_MS, count=500)
        for key, entries in reply or []:
            if key not in self._cursor:
                continue  # nobody listens any more
            for entry in entries:
                for listener in list(self._listeners.get(key, ())):
                    listener.offer(entry)
            if entries:
                self._cursor[key] = entries[-1][0]

    async def close_reader(self) -> None:
        conn, self._conn, self._conn_id = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.aclose()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self.close_reader()
