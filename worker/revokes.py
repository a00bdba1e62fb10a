"""Celery revokes (`celery control revoke ID`, Flower's Revoke) as cancels of our jobs (task id = job id).

A revoke is a broadcast on Celery's control mailbox. Celery's own handling is not enough here: a worker runs its
pool (solo) and its consumer in one thread, so a worker busy with a job reads the revoke only after that job, and by
then it may already have taken the revoked job's message and run it. So every worker also listens to the mailbox on
a thread of its own (a plain consumer on the same fanout exchange; it never replies, so `celery inspect` and Flower
see no extra node) and ends the job in the store at once, as `POST /jobs/{id}/cancel` does:

    revoke ID               a queued job ends as cancelled; a running one runs on (a revoke without terminate never
                            stops a running task)
    revoke --terminate ID   the same for a queued job; a running one is asked to stop (at its next step: a solo pool
                            can't kill its task, the job stops itself)

When the job's message reaches a worker it finds the job ended and does nothing; a message Celery itself drops as
revoked ends its job the same way (`lifecycle`'s `task_revoked` handler), so either path is enough.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from kombu import Queue

from jobs.store import JobStore, release_holds
from jobs.volume import Volume, is_id

log = logging.getLogger(__name__)
RETRY_S = 1.0  # after the broker went away


def cancel_revoked(store: JobStore, vol: Volume, job_id: str, *, terminate: bool = False,
                   reason: str = "its message was revoked (celery control revoke)") -> str:
    """End a revoked job as a cancel would (event, stats, webhook, its holds released); a running one is left
    alone unless `terminate`. Returns the store's outcome (cancelled | requested | running | finished | missing)."""
    outcome = store.cancel(job_id, queued_only=not terminate, reason=reason)
    if outcome == "cancelled":
        log.warning("job %s: revoked while queued; cancelled", job_id)
        job = store.get(job_id)
        if job is not None:
            store.unlist_batchable(job)
            release_holds(store, job, vol)
    elif outcome == "requested":
        log.warning("job %s: revoked with terminate while running; asked to stop", job_id)
    elif outcome == "running":
        log.info("job %s: revoked while running; it runs on (revoke --terminate stops it)", job_id)
    return outcome


def revoked_ids(body) -> tuple[list[str], bool]:
    """The job ids a control message revokes (none for other commands), and whether it asks to terminate."""
    if not isinstance(body, dict) or body.get("method") != "revoke":
        return [], False
    arguments = body.get("arguments") or {}
    ids = arguments.get("task_id")
    ids = [ids] if isinstance(ids, str) else list(ids or [])
    return [i for i in ids if isinstance(i, str) and is_id(i)], bool(arguments.get("terminate"))


def start(app, get_store: Callable[[], JobStore], vol: Volume, node: str, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=_listen, args=(app, get_store, vol, node, stop), name="revokes", daemon=True)
    thread.start()
    return thread


def _listen(app, get_store, vol: Volume, node: str, stop: threading.Event) -> None:
    queue = Queue(f"{node}.minidalle-revokes.{uuid.uuid4().hex[:8]}", exchange=app.control.mailbox.exchange,
                  durable=False, auto_delete=True)

    def on_message(body, message) -> None:
        ids, terminate = revoked_ids(body)
        for job_id in ids:
            try:
                cancel_revoked(get_store(), vol, job_id, terminate=terminate)
            except Exception:  # Redis blips: Celery's own discard (task_revoked) is the second chance
                log.warning("job %s: could not cancel it after its revoke", job_id, exc_info=True)

    while not stop.is_set():
        try:
            with app.connection_for_read() as conn, \
                    conn.Consumer([queue], callbacks=[on_message], accept=["json"], no_ack=True):
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=1.0)
                    except TimeoutError:  # socket.timeout: nothing came within the second
                        continue
        except Exception:  # the broker went away: listen again when it is back
            log.warning("listening for revokes failed; retrying", exc_info=True)
            stop.wait(RETRY_S)
