"""GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel, GET /jobs/{id}/events (Server-Sent Events)."""

from __future__ import annotations

import json
import re
import weakref
from typing import Literal

from fastapi import APIRouter, Header, Query
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from jobs.queue import revoke
from jobs.store import release_holds
from service.access import job_of
from service.admission import forget_queue
from service.deps import HubDep, MaybeVolumeDep, PrincipalDep, QueueDep, SettingsDep, StoreDep
from service.errors import conflict, not_found
from service.schemas import CancelResult, Job, JobList
from service.views import public_job

router = APIRouter(tags=["jobs"])
STREAM_ID_RE = re.compile(r"^\d+-\d+$")


@router.get("/jobs", response_model=JobList)
def list_jobs(store: StoreDep, principal: PrincipalDep, kind: Literal["generate", "finetune", "import"] | None = None,
              state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
              limit: int = Query(50, ge=1, le=500)):
    """This key's jobs (an admin key: everybody's), newest first, optionally filtered by kind and state."""
    owner = None if principal.admin else principal.id
    return {"jobs": [public_job(j) for j in store.list_jobs(kind=kind, state=state, owner=owner, limit=limit)]}


@router.get("/jobs/{job_id}", response_model=Job, responses={404: {"description": "Unknown job."}})
def get_job(job_id: str, store: StoreDep, principal: PrincipalDep):
    """A job's state, progress, result links and error."""
    return public_job(job_of(store, principal, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=CancelResult,
             responses={404: {"description": "Unknown job."}, 409: {"description": "The job already ended."}})
def cancel_job(job_id: str, store: StoreDep, queue: QueueDep, principal: PrincipalDep,
               volume: MaybeVolumeDep = None):
    """Cancel: a queued job never starts; a running one stops at a step boundary within about 0.1 s or a step (a
    fine-tune keeps its checkpoint)."""
    job = job_of(store, principal, job_id)
    outcome = store.cancel(job_id)
    if outcome == "missing":
        raise not_found(f"job_id: job {job_id!r} not found")
    if outcome == "finished":
        ended = store.get(job_id) or job
        raise conflict(f"job_id: job {job_id!r} already ended ({ended['state']})")
    if outcome == "cancelled":
        revoke(queue, job_id)
        forget_queue(job["kind"])
        release_holds(store, job, volume)  # a fine-tune's or an import's adapter name, an import's upload
        return {"job_id": job_id, "state": "cancelled", "detail": "cancelled before it started"}
    return {"job_id": job_id, "state": "running", "detail": "cancel requested; the worker stops shortly"}


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "queued, started, progress…, then succeeded | failed | cancelled"},
                       404: {"description": "Unknown job."}})
async def job_events(job_id: str, store: StoreDep, hub: HubDep, settings: SettingsDep, principal: PrincipalDep,
                     last_event_id: str | None = Header(None)):
    """Server-Sent Events from the job's start (a late listener gets what it missed); ends after the final event."""
    await run_in_threadpool(job_of, store, principal, job_id)
    start = last_event_id if last_event_id and STREAM_ID_RE.match(last_event_id) else "0"
    listener = await hub.open(job_id, start, principal.id)  # 429 now, before the stream starts, past the key's cap
    stream = _stream(hub, listener, settings.sse_ping_s)
    # a client gone before the stream's first step never runs its `finally`: give the slot back when it is dropped
    weakref.finalize(stream, hub.release, listener)
    return EventSourceResponse(stream, ping=int(settings.sse_ping_s))


async def _stream(hub, listener, idle_s: float):
    try:
        async for entry in listener.events(idle_s):
            if entry is None:
                continue  # idle: EventSourceResponse sends its own keep-alive pings
            event_id, fields = entry
            yield {"event": fields.get("type", "message"), "id": event_id,
                   "data": fields.get("data") or json.dumps({})}
    finally:
        hub.release(listener)
