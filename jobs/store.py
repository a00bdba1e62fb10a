"""Job records and event streams in Redis: the truth about every job. Torch-free (the API and workers share it).

    minidalle:job:{id}          hash: id kind state request attempts worker heartbeat_at progress result error ...
    minidalle:job:{id}:events   stream: one entry per event {type, data(json)}; capped, expires with the job
    minidalle:jobs              zset: job ids by creation time (listing)
    minidalle:jobs:active       set: ids of queued/running jobs (reconciler, metrics)
    minidalle:stats             hash: "{kind}:{state}" -> count of jobs that ended in that state
    minidalle:worker:{name}     string (TTL): a worker's presence and readiness (see jobs.presence)

State changes that must not race (claim, cancel, finish, requeue) are the Lua scripts of `jobs.lua`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from jobs.events import EventChannel
from jobs.kinds import KINDS, queue_of
from jobs.lua import ADMIT, CANCEL, CLAIM, FINISH, HEARTBEAT, RECONCILE, RELEASE, REQUEUE
from jobs.volume import Volume, is_id
from jobs.volume import new_id as new_job_id
from jobs.webhooks import OUTBOX_KEY

log = logging.getLogger(__name__)
PREFIX = "minidalle:"
INDEX_KEY = PREFIX + "jobs"
ACTIVE_KEY = PREFIX + "jobs:active"
STATS_KEY = PREFIX + "stats"
WORKER_KEY = PREFIX + "worker:"
RECONCILER_LOCK = PREFIX + "reconciler"
JANITOR_LOCK = PREFIX + "janitor"
ADAPTER_RESERVATION = PREFIX + "adapter-reserved:"
QUEUED_KEY = PREFIX + "queued"  # hash "{queue}:jobs" / "{queue}:seconds": what waits in each queue (estimates)
USAGE_ACTIVE_KEY = PREFIX + "usage:active"  # hash "{owner}:jobs" / "{owner}:seconds": each key's live jobs
WEBHOOK_OUTBOX = OUTBOX_KEY  # job ids whose final state a webhook must announce (pushed by FINISH / CANCEL)
BATCHABLE_KEY = PREFIX + "batchable:"  # zset per batch key: queued generate jobs a worker may run together
UNLIMITED = float("inf")

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def owner_index_key(owner: str) -> str:
    return f"{PREFIX}jobs:owner:{owner}"


def usage_key(owner: str) -> str:
    """A key's totals: images, compute_s, finetune_steps (and jobs_{kind}_{state})."""
    return f"{PREFIX}usage:{owner}"


@dataclass
class Admission:
    """The outcome of `JobStore.admit`: ok, or why not (queue_full | key_jobs | key_seconds) with the seconds of
    work waiting ahead (queue_full: the queue's; key_*: the key's own)."""

    ok: bool
    reason: str = ""
    waiting_s: float = 0.0


@dataclass
class Bounds:
    """What one admission may add up to (inf: no bound)."""

    queued_jobs: float = UNLIMITED
    queued_seconds: float = UNLIMITED
    key_jobs: float = UNLIMITED
    key_seconds: float = UNLIMITED


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def blocking_client(url: str, *, asyncio: bool = False):
    """A client for blocking reads (BLPOP on `done`, XREAD BLOCK on events) that may wait longer than redis-py's
    default 5 s socket timeout; dead peers are still noticed through TCP keepalive and a health check."""
    if asyncio:
        from redis import asyncio as aioredis

        return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=None, socket_connect_timeout=5,
                                       socket_keepalive=True, health_check_interval=30, **reconnecting(asyncio=True))
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=None, socket_connect_timeout=5,
                                socket_keepalive=True, health_check_interval=30, **reconnecting())


def reconnecting(*, asyncio: bool = False) -> dict:
    """Retry a command on a fresh connection when its pooled one died (a Redis restart closes them all): the
    first request after the restart should not be the one that fails."""
    from redis.backoff import ExponentialBackoff

    if asyncio:
        from redis.asyncio.retry import Retry as AsyncRetry

        return {"retry": AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3),
                "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}
    from redis.retry import Retry

    return {"retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}


def done_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:done"


@dataclass
class Claim:
    outcome: str  # run | missing | finished | busy | cancel | exhausted
    detail: str


@dataclass
class Claimed:
    job_id: str
    claim: Claim


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
        self._admit = client.register_script(ADMIT)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._requeue = client.register_script(REQUEUE)
        self._reconcile = client.register_script(RECONCILE)
        self._release = client.register_script(RELEASE)

    @classmethod
    def from_settings(cls, settings) -> JobStore:
        return cls(blocking_client(settings.broker_url), ttl_s=settings.job_ttl_s, events_maxlen=settings.events_maxlen)

    # -- API side -----------------------------------------------------------------------------------------
    def create(self, kind: str, request: dict, *, job_id: str | None = None, owner: str = "anonymous",
               estimate_s: float = 0.0) -> str:
        """Write the record (state queued, not yet enqueued) and its `queued` event, before any enqueue; no bounds."""
        job_id = job_id or new_job_id()
        admission = self.admit(kind, request, job_id=job_id, owner=owner, estimate_s=estimate_s, bounds=Bounds())
        assert admission.ok
        return job_id

    def admit(self, kind: str, request: dict, *, job_id: str, owner: str, estimate_s: float, bounds: Bounds,
              webhook_url: str | None = None, webhook_progress: bool = False, batch_key: str = "") -> Admission:
        """Create the job if the queue and the key have room for it (atomically: no race for the last place).
        A `batch_key` (`GenerateRequest.batch_key`) lists the job where workers look for jobs to batch with theirs."""
        def num(x: float) -> str:
            return "1e300" if x == UNLIMITED else repr(float(x))

        reason, waiting = self._admit(
            keys=[job_key(job_id), events_key(job_id), INDEX_KEY, ACTIVE_KEY, QUEUED_KEY, USAGE_ACTIVE_KEY,
                  owner_index_key(owner), BATCHABLE_KEY + batch_key],
            args=[job_id, kind, json.dumps(request), repr(time.time()), repr(float(estimate_s)), owner, self.maxlen,
                  num(bounds.queued_jobs), num(bounds.queued_seconds), num(bounds.key_jobs), num(bounds.key_seconds),
                  webhook_url or "", "1" if webhook_progress else "0", batch_key, self.ttl_s, queue_of(kind)],
        )
        return Admission(reason == "ok", "" if reason == "ok" else reason, float(waiting or 0))

    def queued(self, queue: str) -> tuple[int, float]:
        """Jobs waiting in a queue (`jobs.kinds.QUEUES`; all kinds that run on it) and their estimated seconds."""
        jobs, secs = cast(list, self.r.hmget(QUEUED_KEY, f"{queue}:jobs", f"{queue}:seconds"))
        return int(jobs or 0), float(secs or 0)

    def active_usage(self, owner: str) -> tuple[int, float]:
        """A key's queued + running jobs and their estimated seconds."""
        jobs, secs = cast(list, self.r.hmget(USAGE_ACTIVE_KEY, f"{owner}:jobs", f"{owner}:seconds"))
        return int(jobs or 0), float(secs or 0)

    def mark_enqueued(self, job_id: str) -> None:
        self.r.hset(job_key(job_id), "enqueued", 1)

    def cancel(self, job_id: str, *, queued_only: bool = False, reason: str = "cancelled before it started") -> str:
        """'cancelled' (was queued), 'requested' (running: it stops soon), 'finished', 'missing'; with `queued_only`
        a running job is left alone: 'running'."""
        data = json.dumps({"reason": reason})
        return self._cancel(
            keys=[job_key(job_id), events_key(job_id), ACTIVE_KEY, STATS_KEY, done_key(job_id), QUEUED_KEY,
                  USAGE_ACTIVE_KEY, WEBHOOK_OUTBOX],
            args=["cancelled", "null", "", self.ttl_s, self.maxlen, data, job_id, "1" if queued_only else "0"],
        )

    def get(self, job_id: str) -> dict | None:
        raw = cast(dict[str, str], self.r.hgetall(job_key(job_id)))
        return decode_job(raw) if raw else None

    def list_jobs(self, *, kind: str | None = None, state: str | None = None, owner: str | None = None,
                  limit: int = 50) -> list[dict]:
        """Newest first (all jobs, or one owner's); filters are applied while paging through the index, so the scan
        stops at `limit`."""
        index = INDEX_KEY if owner is None else owner_index_key(owner)
        out: list[dict] = []
        start, page = 0, max(limit, 100)
        while len(out) < limit:
            ids = cast(list[str], self.r.zrevrange(index, start, start + page - 1))
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
                self.r.zrem(index, *expired)
                start -= len(expired)
            start += len(ids)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (kind, state): live ones counted from the active set, ended ones from the stats counters."""
        counts = {(k, s): 0 for k in KINDS for s in STATES}
        for field, value in cast(dict[str, str], self.r.hgetall(STATS_KEY)).items():
            k, _, s = field.partition(":")
            counts[(k, s)] = int(value)
        ids = self.active_ids()
        p = self.r.pipeline(transaction=False)
        for job_id in ids:
            p.hmget(job_key(job_id), "kind", "state")
        for kind, state in p.execute():
            if kind and state in ("queued", "running"):
                counts[(kind, state)] += 1
        return counts

    def reserve_adapter_name(self, name: str, job_id: str) -> bool:
        """Hold an adapter name for a fine-tune or an import until it ends; False if a live job holds it."""
        key = ADAPTER_RESERVATION + name
        if self.r.set(key, job_id, nx=True):
            return True
        holder = cast(str | None, self.r.get(key))
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
            keys=[job_key(job_id), events_key(job_id), QUEUED_KEY],
            args=[worker, stale_after_s, max_attempts, self.maxlen],
        )
        return Claim(outcome, detail)

    def claim_batchable(self, batch_key: str, worker: str, *, max_images: int, stale_after_s: float,
                        max_attempts: int, scan: int = 64) -> list[Claimed]:
        """Claim queued jobs listed under `batch_key`, oldest first, while their images add up to at most
        `max_images`. Each claim is the usual atomic CLAIM (a job another worker took meanwhile is skipped); the
        Celery delivery of a job claimed here finds it running or ended, and does nothing."""
        if max_images <= 0:
            return []
        key = BATCHABLE_KEY + batch_key
        ids = cast(list[str], self.r.zrange(key, 0, scan - 1))
        if not ids:
            return []
        p = self.r.pipeline(transaction=False)
        for job_id in ids:
            p.hmget(job_key(job_id), "state", "request")
        claimed: list[Claimed] = []
        gone: list[str] = []
        for job_id, (state, request) in zip(ids, p.execute(), strict=True):
            if state != "queued":  # ended (cancelled while queued), running elsewhere, or expired
                gone.append(job_id)
                continue
            images = int((_loads(request) or {}).get("num_images") or 1)
            if images > max_images:
                continue  # stays listed: it fits another batch
            claim = self.claim(job_id, worker, stale_after_s=stale_after_s, max_attempts=max_attempts)
            gone.append(job_id)
            if claim.outcome == "run":
                claimed.append(Claimed(job_id, claim))
                max_images -= images
            elif claim.outcome in ("cancel", "exhausted"):
                claimed.append(Claimed(job_id, claim))  # the caller ends it, as a delivery would
            if max_images <= 0:
                break
        if gone:
            self.r.zrem(key, *gone)
        return claimed

    def oldest_batchable(self, skip: Sequence[str] = ()) -> str | None:
        """The oldest queued generate job listed for batching (any key), not in `skip`; unlists ended ones."""
        best: tuple[float, str] | None = None
        for key in self.r.scan_iter(match=BATCHABLE_KEY + "*", count=100):
            for job_id, created in cast(list, self.r.zrange(key, 0, len(skip) + 16, withscores=True)):
                if job_id in skip:
                    continue
                if self.r.hget(job_key(job_id), "state") != "queued":
                    self.r.zrem(key, job_id)
                    continue
                if best is None or created < best[0]:
                    best = (created, job_id)
                break
        return best[1] if best else None

    def unlist_batchable(self, job: dict) -> None:
        """A job claimed through its own delivery is no longer there to be batched."""
        if job.get("batch_key"):
            self.r.zrem(BATCHABLE_KEY + job["batch_key"], job["id"])

    def list_batchable(self, job: dict) -> None:
        """A generate job back in the queue (its worker stopped) may be batched again."""
        if job.get("batch_key"):
            key = BATCHABLE_KEY + job["batch_key"]
            p = self.r.pipeline(transaction=False)
            p.zadd(key, {job["id"]: job.get("created_at") or time.time()})
            p.expire(key, self.ttl_s)
            p.execute()

    def requeue(self, job_id: str, worker: str, reason: str) -> bool:
        """Give a running job back to the queue (not counted as an attempt); the caller enqueues it again."""
        return bool(self._requeue(keys=[job_key(job_id), events_key(job_id), QUEUED_KEY],
                                  args=[worker, self.maxlen, reason]))

    def heartbeat(self, job_id: str, worker: str) -> bool:
        return bool(self._heartbeat(keys=[job_key(job_id)], args=[worker]))

    def event_commands(self, job_id: str, events: list[tuple[str, dict]], extra: Sequence[tuple] = ()) -> list[tuple]:
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
            flags = channel.receive()
            assert flags is not None  # a batch was just sent
            return flags
        finally:
            channel.close()

    def finish(self, job_id: str, state: str, *, result: dict | None = None, error: str = "") -> bool:
        """Terminal transition (once): record, final event, expiry, stats. False if it had already ended."""
        data: dict[str, Any] = {"result": result} if result is not None else {}
        if error:
            data["error"] = error
        return bool(
            self._finish(
                keys=[job_key(job_id), events_key(job_id), ACTIVE_KEY, STATS_KEY, done_key(job_id), QUEUED_KEY,
                      USAGE_ACTIVE_KEY, WEBHOOK_OUTBOX],
                args=[state, json.dumps(result), error, self.ttl_s, self.maxlen, json.dumps(data), job_id],
            )
        )

    def reconcile_one(self, job_id: str, *, stale_after_s: float, max_attempts: int,
                      enqueue_grace_s: float) -> str:
        return self._reconcile(
            keys=[job_key(job_id), events_key(job_id), ACTIVE_KEY, QUEUED_KEY],
            args=[stale_after_s, max_attempts, self.maxlen, enqueue_grace_s, job_id],
        )

    def active_ids(self) -> list[str]:
        return list(cast(set[str], self.r.smembers(ACTIVE_KEY)))


def release_holds(store: JobStore, job: dict | None, vol: Volume | None) -> None:
    """What a job held until it ended (whoever ends it: its worker, a cancel, a revoke): a fine-tune's or an
    import's hold on its adapter name, an import's uploaded file (on `vol`; without one, the janitor's)."""
    if not job or not job.get("request"):
        return
    request = job["request"]
    if job["kind"] in ("finetune", "import") and request.get("name"):
        store.release_adapter_name(request["name"], job["id"])
    if vol is not None and job["kind"] == "import" and is_id(request.get("upload_id") or ""):
        shutil.rmtree(vol.upload(request["upload_id"]), ignore_errors=True)


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
        "owner": raw.get("owner") or "anonymous",
        "estimate_s": num("estimate_s"),
        "webhook": _loads(raw.get("webhook")),
        "webhook_progress": raw.get("webhook_progress") == "1",
        "cancel_requested": raw.get("cancel_requested") == "1",
        "progress": _loads(raw.get("progress")),
        "result": _loads(raw.get("result")),
        "error": raw.get("error") or None,
        "batch_key": raw.get("batch_key") or None,
    }

