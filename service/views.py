"""How a job record is shown over HTTP (links added), and waiting on a job's event stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from celery import Celery

from jobs.queue import enqueue
from jobs.store import TERMINAL, JobStore, decode_job, events_key, job_key
from jobs.volume import job_links
from service.errors import STORE_DOWN
from service.events import EventHub

log = logging.getLogger(__name__)


def public_job(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k not in ("heartbeat_at", "worker", "batch_key")}
    out["links"] = job_links(job["id"])
    return out


def accepted(job_id: str, state: str = "queued", job: dict | None = None) -> dict:
    lk = job_links(job_id)
    return {"job_id": job_id, "state": state, "status_url": lk["self"], "events_url": lk["events"],
            "cancel_url": lk["cancel"], "job": public_job(job) if job else None}


async def wait_for_end(hub: EventHub, job_id: str, timeout_s: float, owner: str) -> dict | None:
    """Wait until the job ends or the timeout (no polling, no thread and no Redis connection of its own: the
    event hub's listener); then the job as it is (None if its record is gone)."""
    pool = hub.pool
    last = await pool.xrevrange(events_key(job_id), "+", "-", count=1)
    if not (last and last[0][1].get("type") in TERMINAL):
        async with hub.listen(job_id, last[0][0] if last else "0", owner) as listener:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for entry in listener.events(timeout_s):
                        if entry is None:
                            break
    raw = await pool.hgetall(job_key(job_id))
    return decode_job(raw) if raw else None


def enqueue_recorded(store: JobStore, queue: Celery, kind: str, job_id: str) -> None:
    """Queue a job whose record exists. If the queue is unreachable now, the job still exists and the workers'
    reconciler enqueues it after its grace period: the client gets its 202 (a retry would make a second job)."""
    try:
        enqueue(queue, kind, job_id)
        store.mark_enqueued(job_id)
    except STORE_DOWN:
        log.warning("job %s recorded but not enqueued; the reconciler will enqueue it", job_id, exc_info=True)
