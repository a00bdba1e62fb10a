"""Dynamic batching: a generate worker runs compatible queued jobs together, as one denoising loop.

The task delivered (`worker.tasks.generate`) claims its job as any task does; the body then claims, by the same
atomic CLAIM, queued jobs listed under the same batch key (`GenerateRequest.batch_key`: same steps, guidance, size,
scheduler, adapters and scales), oldest first, up to a number of images (`batch_max_images`, memory-aware on GPU),
waiting at most `batch_wait_ms` for more to arrive. Every job keeps its own `JobRun`: its heartbeat, per-step
events, cancel / time-limit checks, files, usage and final state. A job that must stop (cancelled, past its limit,
lost) or whose input is bad leaves the batch at once and ends on its own; the others go on. The Celery delivery
of a job that ran in another's batch finds it running or ended and does nothing (`worker.run.claim`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from jobs.store import JobStore
from worker import lifecycle
from worker.run import JobRun, _worker_name, claim, conclude
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)
POLL_S = 0.001  # while waiting for jobs to batch with, how often the list is read


def images_of(job: dict) -> int:
    return int((job.get("request") or {}).get("num_images") or 1)


class Batch:
    """The runs of one batch that are still going (`runs`); `finish` / `drop` end one of them now."""

    def __init__(self, store: JobStore, worker: str, settings: WorkerSettings):
        self.store, self.worker, self.settings = store, worker, settings
        self.runs: list[JobRun] = []
        self.jobs = 0  # ever in this batch (what the results report)

    def add(self, job: dict) -> JobRun:
        run = JobRun(self.store, job, self.worker, self.settings).__enter__()
        self.runs.append(run)
        self.jobs += 1
        return run

    def alive(self, run: JobRun) -> bool:
        return run in self.runs

    def finish(self, run: JobRun, result: dict) -> None:
        self._end(run, result=result)

    def drop(self, run: JobRun, error: BaseException) -> None:
        """This job stops here, alone: its final state now (a cancelled job's result is thrown away at once)."""
        self._end(run, error=error)

    def _end(self, run: JobRun, *, result: dict | None = None, error: BaseException | None = None) -> None:
        if run not in self.runs:
            return
        self.runs.remove(run)
        try:
            run.__exit__(None, None, None)
        except Exception as e:  # its last events could not be sent: it still gets its final state
            log.warning("job %s: closing its run failed", run.id, exc_info=True)
            error = error or e
        conclude(self.store, run.job, self.worker, self.settings, result=result, error=error)

    def images(self) -> int:
        return sum(images_of(r.job) for r in self.runs)

    def gather(self, max_images: int) -> int:
        """Claim queued jobs that may join (same batch key) until their images reach `max_images` or
        `batch_wait_ms` has passed; returns how many joined."""
        first = self.runs[0].job
        key = first.get("batch_key")
        if not key or max_images <= 1:
            return 0
        joined = 0
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            room = max_images - self.images()
            if room <= 0:
                break
            for c in self.store.claim_batchable(key, self.worker, max_images=room,
                                                stale_after_s=self.settings.stale_after_s,
                                                max_attempts=self.settings.max_attempts):
                job = claim(self.store, c.job_id, self.worker, self.settings, outcome=c.claim)
                if job is not None:
                    self.add(job)
                    joined += 1
            if self.images() >= max_images or time.monotonic() >= deadline or lifecycle.shutting_down():
                break
            time.sleep(POLL_S)
        if joined:
            log.info("job %s: batched with %d more (%d images)", first["id"], joined, self.images())
        return joined


def run_batch(job_id: str, body: Callable[[Batch], None]) -> None:
    """Claim the delivered job, let `body` gather others and run them; every job ends with a final state."""
    settings, store, worker = get_worker_settings(), lifecycle.get_store(), _worker_name()
    job = claim(store, job_id, worker, settings)
    if job is None:
        return
    store.unlist_batchable(job)
    batch = Batch(store, worker, settings)
    try:
        batch.add(job)
        body(batch)
    except Exception as e:  # noqa: BLE001 - each job left gets it as its final state (conclude logs it)
        for run in list(batch.runs):
            batch.drop(run, e)
    for run in list(batch.runs):  # the body returned without ending it: a bug, said as one
        batch.drop(run, RuntimeError("the batch ended without this job's result"))

