"""How a job record is shown over HTTP (links added), and waiting on a job's event stream."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from celery import Celery

from jobs.queue import enqueue
from jobs.store import JobStore, decode_job, done_key, job_key
from jobs.volume import job_links
from service.errors import STORE_DOWN

log = logging.getLogger(__name__)


def public_job(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k not in ("heartbeat_at", "worker")}
    out["links"] = job_links(job["id"])
    return out


def accepted(job_id: str, state: str = "queued", job: dict | None = None) -> dict:
    lk = job_links(job_id)
    return {"job_id": job_id, "state": state, "status_url": lk["self"], "events_url": lk["events"],
            "cancel_url": lk["cancel"], "job": public_job(job) if job else None}


async def wait_for_end(aredis: aioredis.Redis, job_id: str, timeout_s: float) -> dict | None:
    """Wait (no polling, no thread held) until the job ends or the timeout; then the job as it is (None if its
    record is gone). One blocking pop on the job's `done` list, which the final transition pushes to: no wake-up
    per progress event."""
    await aredis.blpop([done_key(job_id)], timeout=timeout_s)
    raw: dict[str, str] = await aredis.hgetall(job_key(job_id))  # type: ignore[assignment]  # decoded
    return decode_job(raw) if raw else None


def enqueue_recorded(store: JobStore, queue: Celery, kind: str, job_id: str) -> None:
    """Queue a job whose record exists. If the queue is unreachable now, the job still exists and the workers'
    reconciler enqueues it after its grace period: the client gets its 202 (a retry would make a second job)."""
    try:
        enqueue(queue, kind, job_id)
        store.mark_enqueued(job_id)
    except STORE_DOWN:
        log.warning("job %s recorded but not enqueued; the reconciler will enqueue it", job_id, exc_info=True)
