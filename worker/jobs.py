"""Job records and event streams in Redis: the truth about every job. Torch-free (the API uses it too).

    minidalle:job:{id}          hash: id kind state request attempts worker heartbeat_at progress result error ...
    minidalle:job:{id}:events   stream: one entry per event {type, data(json)}; capped, expires with the job
    minidalle:jobs              zset: job ids by creation time (listing)
    minidalle:jobs:active       set: ids of queued/running jobs (reconciler, metrics)
    minidalle:stats             hash: "{kind}:{state}" -> count of jobs that ended in that state
    minidalle:worker:{name}     string (TTL): a worker's presence and readiness (see worker.presence)

State changes that must not race (claim, cancel, finish, requeue) are Lua scripts, so they are atomic; times in
them come from Redis' clock, so staleness never depends on two machines' clocks agreeing.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)
PREFIX = "minidalle:"
INDEX_KEY = PREFIX + "jobs"
ACTIVE_KEY = PREFIX + "jobs:active"
STATS_KEY = PREFIX + "stats"
WORKER_KEY = PREFIX + "worker:"
RECONCILER_LOCK = PREFIX + "reconciler"
JANITOR_LOCK = PREFIX + "janitor"
ADAPTER_RESERVATION = PREFIX + "adapter-reserved:"

KINDS = ("generate", "finetune")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def blocking_client(url: str, *, asyncio: bool = False):
    """A client for blocking reads (BLPOP on `done`, XREAD BLOCK on events) that may wait longer than redis-py's
    default 5 s socket timeout; dead peers are still noticed through TCP keepalive and a health check."""
    options = dict(decode_responses=True, socket_timeout=None, socket_connect_timeout=5, socket_keepalive=True,
                   health_check_interval=30)
    if asyncio:
        from redis import asyncio as aioredis

        return aioredis.Redis.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def done_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:done"


def new_job_id() -> str:
    return uuid.uuid4().hex


_NOW = "local _t = redis.call('TIME'); local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000\n"

# KEYS: job, events, active, stats, done; ARGV: state, result_json, error, ttl, maxlen, event_data_json, job_id
# `done` gets the final state pushed, for the one request that waits on the job (BLPOP, no wake-up per step)
_FINISH_BODY = """
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', tostring(now), 'result', ARGV[2], 'error', ARGV[3])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[1], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[7])
redis.call('HINCRBY', KEYS[4], redis.call('HGET', KEYS[1], 'kind') .. ':' .. ARGV[1], 1)
redis.call('RPUSH', KEYS[5], ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[4])
"""

FINISH = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
"""
    + _FINISH_BODY
    + "return 1"
)

# Same KEYS/ARGV as FINISH (state = 'cancelled'); a queued job ends now, a running one is asked to stop.
CANCEL = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'finished' end
if state == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'cancel_requested', 'data', '{}')
  end
  return 'requested'
end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
"""
    + _FINISH_BODY
    + "return 'cancelled'"
)

# KEYS: job, events; ARGV: worker, stale_after, max_attempts, maxlen
CLAIM = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if state ~= 'queued' and state ~= 'running' then return {'finished', state} end
if state == 'running' then
  local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0')
  if now - hb < tonumber(ARGV[2]) then return {'busy', redis.call('HGET', KEYS[1], 'worker') or ''} end
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {'cancel', ''} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then return {'exhausted', tostring(attempts - 1)} end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'heartbeat_at', tostring(now), 'enqueued', '1')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', tostring(now)) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'started',
  'data', cjson.encode({attempt = attempts, worker = ARGV[1]}))
return {'run', tostring(attempts)}
"""
)

# KEYS: job, events; ARGV: worker, maxlen, reason. The owner hands a running job back to the queue (its worker is
# shutting down): queued again, this attempt not counted. 1 if it was still this worker's.
REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'enqueued', '0')
redis.call('HDEL', KEYS[1], 'worker')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', 'requeued', 'data', cjson.encode({reason = ARGV[3]}))
return 1
"""

# KEYS: job; ARGV: worker. 1 while this worker still owns the running job, else 0.
HEARTBEAT = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat_at', tostring(now))
return 1
"""
)

# KEYS: job, events, active; ARGV: stale_after, max_attempts, maxlen, enqueue_grace, job_id
RECONCILE = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  redis.call('SREM', KEYS[3], ARGV[5])
  return 'gone'
end
if state == 'running' then
  local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0')
  if now - hb < tonumber(ARGV[1]) then return 'ok' end
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  if attempts >= tonumber(ARGV[2]) then return 'exhausted' end
  if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 'cancel' end
  redis.call('HSET', KEYS[1], 'state', 'queued', 'enqueued', '1')
  redis.call('HDEL', KEYS[1], 'worker')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'requeued',
    'data', cjson.encode({reason = 'worker heartbeat stale', attempts = attempts}))
  return 'requeue'
end
if redis.call('HGET', KEYS[1], 'enqueued') ~= '1' then
  local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '0')
  if now - created < tonumber(ARGV[4]) then return 'ok' end
  redis.call('HSET', KEYS[1], 'enqueued', '1')
  return 'enqueue'
end
return 'ok'
"""
)

# KEYS: reservation; ARGV: holder. Compare-and-delete.
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def image_url(job_id: str, index: int) -> str:
    return f"/images/{job_id}/{index}.png"


def adapter_url(name: str) -> str:
    return f"/adapters/{name}"


@dataclass
class Claim:
    outcome: str  # run | missing | finished | busy | cancel | exhausted
    detail: str


def _loads(value: str | None) -> Any:
    return json.loads(value) if value else None


class JobStore:
    """Job records over one synchronous Redis client (decode_responses=True)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, events_maxlen: int):
        self.r = client
        self.ttl_s = ttl_s
        self.maxlen = events_maxlen
        self._finish = client.register_script(FINISH)
        self._cancel = client.register_script(CANCEL)
        self._claim = client.register_script(CLAIM)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._requeue = client.register_script(REQUEUE)
        self._reconcile = client.register_script(RECONCILE)
        self._release = client.register_script(RELEASE)

    @classmethod
    def from_settings(cls, settings) -> JobStore:
        return cls(blocking_client(settings.broker_url), ttl_s=settings.job_ttl_s, events_maxlen=settings.events_maxlen)

    # -- API side -----------------------------------------------------------------------------------------
    def create(self, kind: str, request: dict, *, job_id: str | None = None) -> str:
        """Write the record (state queued, not yet enqueued) and its `queued` event, before any enqueue."""
        job_id = job_id or new_job_id()
        now = time.time()
        p = self.r.pipeline(transaction=True)
        p.hset(
            job_key(job_id),
            mapping={
                "id": job_id,
                "kind": kind,
                "state": "queued",
                "request": json.dumps(request),
                "created_at": repr(now),
                "attempts": 0,
                "enqueued": 0,
            },
        )
        p.zadd(INDEX_KEY, {job_id: now})
        p.sadd(ACTIVE_KEY, job_id)
        p.xadd(events_key(job_id), {"type": "queued", "data": json.dumps({"kind": kind})}, maxlen=self.maxlen)
        p.execute()
        return job_id

    def mark_enqueued(self, job_id: str) -> None:
        self.r.hset(job_key(job_id), "enqueued", 1)

    def cancel(self, job_id: str) -> str:
        """'cancelled' (was queued), 'requested' (running: it stops soon), 'finished', 'missing'."""
        data = json.dumps({"reason": "cancelled before it started"})
        return self._cancel(
            keys=[job_key(job_id), events_key(job_id), ACTIVE_KEY, STATS_KEY, done_key(job_id)],
            args=["cancelled", "null", "", self.ttl_s, self.maxlen, data, job_id],
        )

    def get(self, job_id: str) -> dict | None:
        raw = self.r.hgetall(job_key(job_id))
        return decode_job(raw) if raw else None

    def list(self, *, kind: str | None = None, state: str | None = None, limit: int = 50) -> list[dict]:
        """Newest first; filters are applied while paging through the index, so the scan stops at `limit`."""
        out: list[dict] = []
        start, page = 0, max(limit, 100)
        while len(out) < limit:
            ids = self.r.zrevrange(INDEX_KEY, start, start + page - 1)
            if not ids:
                break
            p = self.r.pipeline(transaction=False)
            for job_id in ids:
                p.hgetall(job_key(job_id))
            expired = []
            for job_id, raw in zip(ids, p.execute(), strict=True):
                if not raw:
                    expired.append(job_id)
                    continue
                job = decode_job(raw)
                if (kind is None or job["kind"] == kind) and (state is None or job["state"] == state):
                    out.append(job)
                    if len(out) == limit:
                        break
            if expired:
                self.r.zrem(INDEX_KEY, *expired)
                start -= len(expired)
            start += len(ids)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (kind, state): live ones counted from the active set, ended ones from the stats counters."""
        counts = {(k, s): 0 for k in KINDS for s in STATES}
        for field, value in self.r.hgetall(STATS_KEY).items():
            k, _, s = field.partition(":")
            counts[(k, s)] = int(value)
        ids = list(self.r.smembers(ACTIVE_KEY))
        p = self.r.pipeline(transaction=False)
        for job_id in ids:
            p.hmget(job_key(job_id), "kind", "state")
        for kind, state in p.execute():
            if kind and state in ("queued", "running"):
                counts[(kind, state)] += 1
        return counts

    def reserve_adapter_name(self, name: str, job_id: str) -> bool:
        """Hold an adapter name for a fine-tune until it ends; False if a live job holds it."""
        key = ADAPTER_RESERVATION + name
        if self.r.set(key, job_id, nx=True):
            return True
        holder = self.r.get(key)
        job = self.get(holder) if holder else None
        if job is not None and job["state"] not in TERMINAL:
            return False
        if holder:  # a stale hold (its job ended without releasing it): take it over
            self._release(keys=[key], args=[holder])
        return bool(self.r.set(key, job_id, nx=True))

    def release_adapter_name(self, name: str, job_id: str) -> None:
        self._release(keys=[ADAPTER_RESERVATION + name], args=[job_id])

    # -- worker side --------------------------------------------------------------------------------------
    def claim(self, job_id: str, worker: str, *, stale_after_s: float, max_attempts: int) -> Claim:
        outcome, detail = self._claim(
            keys=[job_key(job_id), events_key(job_id)],
            args=[worker, stale_after_s, max_attempts, self.maxlen],
        )
        return Claim(outcome, detail)

    def requeue(self, job_id: str, worker: str, reason: str) -> bool:
        """Give a running job back to the queue (not counted as an attempt); the caller enqueues it again."""
        return bool(self._requeue(keys=[job_key(job_id), events_key(job_id)], args=[worker, self.maxlen, reason]))

    def heartbeat(self, job_id: str, worker: str) -> bool:
        return bool(self._heartbeat(keys=[job_key(job_id)], args=[worker]))

    def event_commands(self, job_id: str, events: list[tuple[str, dict]], extra: list[tuple] = ()) -> list[tuple]:
        """Commands that append `events` (the last progress one is also recorded in the job), then `extra`, then
        read the job's cancel / owner / state fields (always the last reply)."""
        commands: list[tuple] = []
        progress = None
        for kind, data in events:
            payload = json.dumps(data)
            commands.append(("XADD", events_key(job_id), "MAXLEN", "~", self.maxlen, "*", "type", kind,
                             "data", payload))
            if kind == "progress":
                progress = payload
        if progress is not None:
            commands.append(("HSET", job_key(job_id), "progress", progress))
        commands.extend(extra)
        commands.append(("HMGET", job_key(job_id), "cancel_requested", "worker", "state"))
        return commands

    def publish_batch(self, job_id: str, worker: str, events: list[tuple[str, dict]]) -> tuple[bool, bool]:
        """Append events in one round trip; returns (cancel_requested, still_owned_by_worker)."""
        channel = EventChannel(self, job_id, worker)
        try:
            channel.send(events)
            return channel.receive()
        finally:
            channel.close()

    def finish(self, job_id: str, state: str, *, result: dict | None = None, error: str = "") -> bool:
        """Terminal transition (once): record, final event, expiry, stats. False if it had already ended."""
        data: dict[str, Any] = {"result": result} if result is not None else {}
        if error:
            data["error"] = error
        return bool(
            self._finish(
                keys=[job_key(job_id), events_key(job_id), ACTIVE_KEY, STATS_KEY, done_key(job_id)],
                args=[state, json.dumps(result), error, self.ttl_s, self.maxlen, json.dumps(data), job_id],
            )
        )

    def reconcile_one(self, job_id: str, *, stale_after_s: float, max_attempts: int,
                      enqueue_grace_s: float) -> str:
        return self._reconcile(
            keys=[job_key(job_id), events_key(job_id), ACTIVE_KEY],
            args=[stale_after_s, max_attempts, self.maxlen, enqueue_grace_s, job_id],
        )

    def active_ids(self) -> list[str]:
        return list(self.r.smembers(ACTIVE_KEY))


class EventChannel:
    """A running job's events, pipelined over one connection of its own.

    `send` writes a batch and returns without waiting for Redis; `receive` reads that batch's replies, the last
    of which are the job's cancel / owner fields. A worker sends after a step and receives during the next one,
    when the replies have long arrived, so its compute loop does not wait on round trips. At most one batch is
    in flight: `send` first receives the previous one, so replies never get out of step with their commands.
    A command Redis refused (OOM, READONLY, ...) is logged; the flags are still read. A broken connection is
    dropped and raises; the next `send` opens another.
    """

    READ_TIMEOUT_S = 30.0  # replies are normally there already; this only bounds a Redis that hangs

    def __init__(self, store: JobStore, job_id: str, worker: str):
        self.store, self.job_id, self.worker = store, job_id, worker
        self._conn = None
        self._in_flight = 0  # replies still to read

    def send(self, events: list[tuple[str, dict]], extra: list[tuple] = ()) -> tuple[bool, bool] | None:
        """Write a batch; returns the previous batch's outcome (see `receive`) if one was still in flight."""
        try:
            previous = self.receive()
        except redis.RedisError:  # its connection is gone; this batch goes on a new one
            previous = None
        commands = self.store.event_commands(self.job_id, events, extra)
        if self._conn is None:
            self._conn = self.store.r.connection_pool.get_connection()
        try:
            self._conn.send_packed_command(self._conn.pack_commands(commands))
        except BaseException:
            self._drop()
            raise
        self._in_flight = len(commands)
        return previous

    def receive(self) -> tuple[bool, bool] | None:
        """The last batch's outcome: (cancel requested, still owned by this worker); None if none is in flight."""
        if not self._in_flight:
            return None
        replies = []
        try:
            for _ in range(self._in_flight):
                try:
                    replies.append(self._conn.read_response(timeout=self.READ_TIMEOUT_S))
                except redis.ResponseError as e:  # one command failed; the others' replies still follow
                    replies.append(e)
        except BaseException:
            self._drop()
            raise
        finally:
            self._in_flight = 0
        failed = [r for r in replies[:-1] if isinstance(r, Exception)]
        if failed:
            log.warning("job %s: Redis refused %d of %d event commands: %s", self.job_id, len(failed),
                        len(replies) - 1, failed[0])
        if isinstance(replies[-1], Exception):
            raise replies[-1]
        cancel, owner, state = replies[-1]
        return cancel == "1", owner == self.worker and state == "running"

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self.receive()
        except Exception:  # noqa: BLE001 - closing: the connection is dropped anyway
            pass
        if self._conn is not None:
            self.store.r.connection_pool.release(self._conn)
            self._conn = None

    def _drop(self) -> None:
        self._in_flight = 0
        if self._conn is not None:
            self._conn.disconnect()
            self.store.r.connection_pool.release(self._conn)
            self._conn = None


def decode_job(raw: dict[str, str]) -> dict:
    def num(name: str) -> float | None:
        v = raw.get(name)
        return float(v) if v else None

    return {
        "id": raw["id"],
        "kind": raw["kind"],
        "state": raw["state"],
        "request": _loads(raw.get("request")),
        "created_at": num("created_at"),
        "started_at": num("started_at"),
        "finished_at": num("finished_at"),
        "heartbeat_at": num("heartbeat_at"),
        "attempts": int(raw.get("attempts") or 0),
        "worker": raw.get("worker") or None,
        "cancel_requested": raw.get("cancel_requested") == "1",
        "progress": _loads(raw.get("progress")),
        "result": _loads(raw.get("result")),
        "error": raw.get("error") or None,
    }

