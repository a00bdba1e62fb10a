"""Worker process lifecycle (Celery signals): preload the pipeline, announce presence, run the reconciler (and,
less often, the data volume's janitor), end a job whose message was revoked (`celery control revoke`, Flower).

The reconciler exists because Celery's Redis transport does not promptly re-deliver the task of a worker that
died (a worker only restores unacknowledged messages older than the visibility timeout, and only when it starts).
Every worker runs it; a Redis lock lets one pass run at a time.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import signals

from jobs import presence, queue
from jobs.store import JANITOR_LOCK, RECONCILER_LOCK, JobStore, job_key, release_holds
from jobs.volume import Volume
from worker import janitor, revokes
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)
_state: dict = {"node": f"worker@{os.uname().nodename}", "queues": [], "phase": "starting"}
_store: JobStore | None = None
_stop = threading.Event()
_shutting_down = False  # set from Celery's signal handler, so a plain flag (a lock there can deadlock)


def node_name() -> str:
    return _state["node"]


def queues() -> list[str]:
    """The queues this worker consumes."""
    return _state["queues"]


def get_store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_settings(get_worker_settings())
    return _store


def enqueue(kind: str, job_id: str) -> None:
    """Send a job's task again (the reconciler, a job handed back at shutdown)."""
    from worker.celery_app import app

    queue.enqueue(app, kind, job_id)


def release_resources(store: JobStore, job: dict | None) -> None:
    """What a job held until it ended: a fine-tune's or an import's hold on its adapter name, an import's upload."""
    release_holds(store, job, Volume(get_worker_settings().data_dir))


@signals.task_revoked.connect
def _on_task_revoked(request=None, terminated=False, **_):
    """Celery dropped a revoked message (task id = job id) instead of running it: its job ends as a cancel would end
    it, if the revoke listener (`worker.revokes`) has not ended it already. A running job is left alone: the
    dropped message was a duplicate (the job runs here or elsewhere)."""
    job_id = getattr(request, "id", None)
    if not job_id:
        return
    try:
        revokes.cancel_revoked(get_store(), Volume(get_worker_settings().data_dir), job_id)
    except Exception:  # Celery's consumer must not die of it; the job stays as it was
        log.warning("job %s: could not cancel it after its message was revoked", job_id, exc_info=True)


@signals.worker_init.connect
def _on_worker_init(sender=None, **_):
    settings = get_worker_settings()
    _state["node"] = sender.hostname
    _state["queues"] = sorted(sender.app.amqp.queues.consume_from or {})
    _state["phase"] = "loading"
    threading.Thread(target=_presence_loop, name="presence", daemon=True).start()
    threading.Thread(target=_reconcile_loop, name="reconciler", daemon=True).start()
    from worker import webhooks

    webhooks.start(get_store(), settings, _stop)  # delivers the webhooks of every worker's finished jobs
    # revokes (celery control revoke, Flower) are acted on at once, even while this worker is busy with a job
    revokes.start(sender.app, get_store, Volume(settings.data_dir), _state["node"], _stop)
    if settings.preload:
        from worker.runtime import get_pipeline

        pipe = get_pipeline(settings)  # before the consumer starts: no task waits on a half-started worker
        if settings.calibrate:
            try:
                from worker.runtime import calibrate

                calibrate(pipe, get_store(), settings)
            except Exception:  # the cost model falls back to its default; the worker still serves
                log.warning("calibration failed", exc_info=True)
    _state["phase"] = "ready"
    _publish_presence()


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_):
    """Ctrl-C / SIGTERM reached the worker (Celery sends this from its signal handler): the running job stops at
    its next step and goes back to the queue (a fine-tune saves a checkpoint first), so the worker exits in a step
    instead of being killed after its stop timeout, and the job resumes on the next worker."""
    global _shutting_down
    _shutting_down = True


def shutting_down() -> bool:
    return _shutting_down


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_):
    _stop.set()
    try:
        presence.remove(get_store().r, node_name())
    except Exception:  # noqa: BLE001 - Redis may already be gone at shutdown
        pass


def _publish_presence() -> None:
    s = get_worker_settings()
    presence.publish(get_store().r, node_name(), {"queues": _state["queues"], "state": _state["phase"],
                                                  "model": s.model_name, "pid": os.getpid()},
                     ttl_s=3 * s.presence_interval_s)


def _presence_loop() -> None:
    s = get_worker_settings()
    while not _stop.is_set():
        try:
            _publish_presence()
        except Exception:
            log.warning("could not publish worker presence", exc_info=True)
        _stop.wait(s.presence_interval_s)


def _reconcile_loop() -> None:
    s = get_worker_settings()
    while not _stop.wait(s.reconcile_interval_s):
        try:
            reconcile_once(get_store())
        except Exception:
            log.warning("reconciler pass failed", exc_info=True)
        try:
            sweep_if_due(get_store())
        except Exception:
            log.warning("janitor pass failed", exc_info=True)


def sweep_if_due(store: JobStore) -> dict[str, list[str]] | None:
    """The data volume's janitor, once per janitor_interval_s across all workers (the lock expires with it)."""
    s = get_worker_settings()
    if not store.r.set(JANITOR_LOCK, node_name(), nx=True, px=int(s.janitor_interval_s * 1000)):
        return None
    return janitor.sweep(store, s.data_dir, job_ttl_s=s.job_ttl_s, dataset_ttl_s=s.dataset_ttl_s)


def reconcile_once(store: JobStore) -> dict[str, str]:
    """Re-enqueue running jobs whose heartbeat went stale and recorded jobs that were never enqueued."""
    s = get_worker_settings()
    if not store.r.set(RECONCILER_LOCK, node_name(), nx=True, px=int(s.reconcile_interval_s * 900)):
        return {}
    outcomes = {}
    for job_id in store.active_ids():
        outcome = store.reconcile_one(job_id, stale_after_s=s.stale_after_s, max_attempts=s.max_attempts,
                                      enqueue_grace_s=max(10.0, s.heartbeat_interval_s))
        outcomes[job_id] = outcome
        if outcome in ("requeue", "enqueue"):
            kind = store.r.hget(job_key(job_id), "kind")
            log.warning("reconciler: %s job %s (%s)", outcome, job_id, kind)
            enqueue(kind, job_id)
        elif outcome in ("exhausted", "cancel"):
            error = "" if outcome == "cancel" else (
                f"gave up after {s.max_attempts} attempts: the worker running it stopped each time")
            store.finish(job_id, "failed" if outcome == "exhausted" else "cancelled", error=error)
            release_resources(store, store.get(job_id))
    return outcomes
