"""How a job record is shown over HTTP (links added), and waiting on a job's event stream."""

from __future__ import annotations

import time

from worker.jobs import TERMINAL, JobStore, events_key


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/jobs/{job_id}", "events": f"/jobs/{job_id}/events", "cancel": f"/jobs/{job_id}/cancel"}


def public_job(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k not in ("heartbeat_at", "worker")}
    out["links"] = links(job["id"])
    return out


def accepted(job_id: str, state: str = "queued", job: dict | None = None) -> dict:
    lk = links(job_id)
    return {"job_id": job_id, "state": state, "status_url": lk["self"], "events_url": lk["events"],
            "cancel_url": lk["cancel"], "job": public_job(job) if job else None}


def wait_for_end(store: JobStore, job_id: str, timeout_s: float) -> bool:
    """Block on the job's event stream (no polling) until its final event or the timeout; True if it ended."""
    deadline = time.monotonic() + timeout_s
    last = "0"
    while (left := deadline - time.monotonic()) > 0:
        resp = store.r.xread({events_key(job_id): last}, block=max(1, int(left * 1000)), count=100)
        for _key, entries in resp or []:
            for event_id, fields in entries:
                last = event_id
                if fields.get("type") in TERMINAL:
                    return True
    return False
