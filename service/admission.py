"""Admission: what a request would cost, and whether the queue and the key have room for it, before it is queued.

The cost is the cost model's estimate in worker-seconds (`jobs.cost`). A job estimated to run longer than the
service's time limit for its kind (its queue's) is refused with a 422 that gives the estimate and the limit. Otherwise
the job is created only if its queue (jobs and estimated seconds waiting, whatever their kinds: `jobs.kinds`) and its
key (live jobs and their seconds) stay within their bounds, atomically (`JobStore.admit`); past a bound the answer
is 429 with `Retry-After`: the estimated time for the work ahead to drain on the workers serving that queue.
"""

from __future__ import annotations

import json
import math
import time

from fastapi import HTTPException

from jobs import presence
from jobs.cost import CostModel
from jobs.keys import Principal
from jobs.kinds import queue_of
from jobs.store import QUEUED_KEY, WORKER_KEY, Bounds, JobStore
from jobs.volume import new_id
from service.errors import invalid
from service.settings import ApiSettings
from service.views import enqueue_recorded

REASONS = {
    "queue_full": "the {queue} queue is full ({waiting:.0f} s of work waiting)",
    "key_jobs": "this key has {jobs} jobs queued or running, its limit",
    "key_seconds": "this key's queued and running jobs already need {waiting:.0f} s; its limit is {limit:.0f} s",
}


_WORKERS: dict[str, tuple[int, float]] = {}
# the pre-check reads the queue's size at most this often (a flood must not cost a round trip a request); a stale
# answer only decides between the cheap 429 and the full admission, which checks again, atomically
PRECHECK_S = 0.05
_QUEUED: dict[str, tuple[tuple, float]] = {}


async def ready_workers(aredis, queue: str) -> int:
    """Workers with the model loaded serving `queue` (cached a second: asked on every refusal of a flood)."""
    hit = _WORKERS.get(queue)
    if hit is not None and time.monotonic() - hit[1] < 1.0:
        return hit[0]
    keys = [k async for k in aredis.scan_iter(match=WORKER_KEY + "*", count=500)]
    infos = [json.loads(v) for v in (await aredis.mget(keys) if keys else []) if v]
    n = presence.tally(infos, (queue,))[queue]
    _WORKERS[queue] = (n, time.monotonic())
    return n


def forget_queue(kind: str) -> None:
    """This process just freed a place in the kind's queue (a cancel): the next pre-check reads the queue again."""
    _QUEUED.pop(queue_of(kind), None)


async def precheck(aredis, settings: ApiSettings, kind: str) -> None:
    """A cheap refusal before any work (tokenizing, estimating) when the kind's queue is already full: under a flood
    most requests end here. `admit` stays the authority, atomically."""
    queue = queue_of(kind)
    hit = _QUEUED.get(queue)
    if hit is not None and time.monotonic() - hit[1] < PRECHECK_S:
        jobs, seconds = hit[0]
    else:
        jobs, seconds = await aredis.hmget(QUEUED_KEY, f"{queue}:jobs", f"{queue}:seconds")
        _QUEUED[queue] = ((jobs, seconds), time.monotonic())
    if int(jobs or 0) >= getattr(settings, f"max_queued_{queue}") or \
            float(seconds or 0) >= getattr(settings, f"max_queued_{queue}_s"):
        retry = max(1, math.ceil(float(seconds or 0) / max(1, await ready_workers(aredis, queue))))
        raise HTTPException(429, f"the {queue} queue is full ({float(seconds or 0):.0f} s of work waiting); retry "
                            f"in about {retry} s", headers={"Retry-After": str(retry)})


def cost_model(store: JobStore, settings: ApiSettings, model) -> CostModel:
    return CostModel(store.r, settings.model_name, native_size=model.default_size, vae_factor=model.vae_factor,
                     default_step_s=settings.default_step_s)


def check_time_limit(kind: str, estimate_s: float, settings: ApiSettings, field: str, hint: str) -> None:
    limit = settings.time_limit_s(kind)
    if estimate_s > limit:
        raise invalid(field, f"this {kind} is estimated at {estimate_s:.0f} s on one worker, above the service's "
                      f"time limit of {limit} s; {hint}", round(estimate_s, 1))


def admit(store: JobStore, queue, settings: ApiSettings, principal: Principal, kind: str, request: dict, *,
          estimate_s: float, job_id: str | None = None, batch_key: str = "") -> str:
    """Create and enqueue the job, or raise 429 (its queue's or its key's limit) with Retry-After."""
    job_id = job_id or new_id()
    limits = principal.limits
    queue_name = queue_of(kind)  # a kind shares its queue's bounds with every kind that runs there
    bounds = Bounds(
        queued_jobs=getattr(settings, f"max_queued_{queue_name}"),
        queued_seconds=getattr(settings, f"max_queued_{queue_name}_s"),
        key_jobs=math.inf if principal.anonymous else limits.concurrent_jobs or settings.key_concurrent_jobs,
        key_seconds=math.inf if principal.anonymous else limits.queued_seconds or settings.key_queued_seconds)
    webhook = request.get("webhook_url")
    outcome = store.admit(kind, request, job_id=job_id, owner=principal.id, estimate_s=estimate_s, bounds=bounds,
                          webhook_url=webhook, webhook_progress=bool(request.get("webhook_progress")),
                          batch_key=batch_key)
    if not outcome.ok:
        workers = max(1, presence.ready_by_queue(store.r, (queue_name,)).get(queue_name, 0))
        retry = max(1, math.ceil(outcome.waiting_s / workers))
        jobs, _ = store.active_usage(principal.id)
        detail = REASONS[outcome.reason].format(queue=queue_name, waiting=outcome.waiting_s, jobs=jobs,
                                                limit=bounds.key_seconds)
        raise HTTPException(429, f"{detail}; retry in about {retry} s", headers={"Retry-After": str(retry)})
    enqueue_recorded(store, queue, kind, job_id)
    return job_id
