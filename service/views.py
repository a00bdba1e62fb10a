"""How a job record is shown over HTTP (links added), and waiting on a job's event stream."""

from __future__ import annotations

from worker.jobs import TERMINAL, JobStore, done_key


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
    """Block (no polling) until the job ends or the timeout; True if it ended. One blocking pop on the job's
    `done` list, which the final transition pushes to: no wake-up per progress event."""
    if store.r.blpop([done_key(job_id)], timeout=timeout_s):
        return True
    job = store.get(job_id)
    return job is not None and job["state"] in TERMINAL
