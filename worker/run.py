"""One claimed run of a job: the claim, heartbeat, per-step events, and the checks that stop it (cancel, lost,
time limit, shutdown); then its final state. The task bodies (`worker.tasks`) only do the job's work.

A task may run more than once (at-least-once delivery, a reconciler re-enqueue): `JobStore.claim` lets one run own
the job; what the body writes is keyed by job id and renamed into place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from jobs.events import EventChannel
from jobs.metrics import StepTimings
from jobs.requests import api_name
from jobs.store import TERMINAL, Claim, JobStore, job_key, usage_key
from minidalle import Cancelled
from minidalle.errors import InvalidInput
from worker import lifecycle
from worker.settings import WorkerSettings, get_worker_settings
from worker.webhooks import note_progress

log = logging.getLogger(__name__)
# Progress events go to Redis in batches, at most this often (SSE still gets one event per step).
PUBLISH_EVERY_S = 0.1
# After a step at least this long, wait for the batch's reply at once (a round trip is nothing next to it), so a
# cancel is seen at the very next step instead of one step later.
WAIT_AFTER_STEP_S = 0.5
YIELD_CHECK_S = 0.25  # how often a fine-tune looks whether image requests wait
KEEP_UNSENT_EVENTS = 10_000  # while Redis is unreachable, the newest events wait for the next batch


class Stop(Cancelled):  # a Cancelled, so the trainer saves a checkpoint before it propagates
    """Why a running job must stop at this step: cancelled, lost (another worker took it over), time_limit,
    shutdown (its worker stops), yield (a fine-tune gives way to waiting image requests)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JobRun:
    """One claimed run of a job: heartbeat, per-step events, cancel / ownership / time-limit checks.

    Events are buffered and sent from the compute thread over the job's EventChannel: a batch at most every
    PUBLISH_EVERY_S, whose reply (which carries the cancel / ownership flags) is read during the next step, so
    the steps never wait on Redis. A cancel is seen once a batch's reply carries it: within about PUBLISH_EVERY_S
    for fast steps, one step late for steps of 0.1-0.5 s, at the next step for longer ones (their reply is
    awaited). Events other than progress are sent and confirmed at once. No thread sits between the steps and
    Redis: on a busy host, waking one per batch (and waiting for it to drain at the end) cost more than the round
    trips it saved. The heartbeat is a thread, so a step that takes minutes never lets it go stale.
    """

    def __init__(self, store: JobStore, job: dict, worker: str, settings: WorkerSettings):
        self.store, self.job, self.worker, self.settings = store, job, worker, settings
        self.id, self.kind = job["id"], job["kind"]
        self.deadline = time.monotonic() + settings.time_limit_s(self.kind)
        self.timings = StepTimings(self.kind)
        self.lost = False
        self.flags = (False, True)  # (cancel requested, still owned), as of the last batch's reply
        self._last = self._started = time.perf_counter()
        self._step_s = 0.0  # how long the last step took
        self.step_seconds: list[float] = []  # every step of this run (the cost model learns from them)
        self.images = 0  # made by this run (usage)
        self.share = 1.0  # of the compute it ran in (a batch's jobs share its time by their images)
        self.extra_commands: list[tuple] = []  # Redis commands the body wants sent with the last events
        self._running_since = time.monotonic()
        self._yield_checked = 0.0
        self._waiting_since: float | None = None  # when image requests were first seen waiting
        self._progress_hook = job.get("webhook_progress")
        self._sent_at: float | None = None  # perf_counter of the last batch sent; None: nothing sent yet
        self._events: list[tuple[str, dict]] = []
        self._channel = EventChannel(store, self.id, worker)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.id}", daemon=True)

    def __enter__(self) -> JobRun:
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.flush(extra=self.timings.commands() + self._usage_commands() + self.extra_commands)
        if self._events:  # the last batch could not be sent: once more, on a new connection
            self.flush()
        self._channel.close()
        self._stop.set()
        self._beat.join()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                if not self.store.heartbeat(self.id, self.worker):
                    self.lost = True
            except Exception:  # Redis blips: the next beat retries
                log.warning("heartbeat for %s failed", self.id, exc_info=True)

    def step_done(self) -> float:
        now = time.perf_counter()
        self._step_s, self._last = now - self._last, now
        self.timings.add(self._step_s)
        self.step_seconds.append(self._step_s)
        return self._step_s

    def _usage_commands(self) -> list[tuple]:
        """What this run used, added to its key's totals (GET /usage) with the run's last batch of events."""
        key = usage_key(self.job["owner"])
        took = (time.perf_counter() - self._started) * self.share
        commands: list[tuple] = [("HINCRBYFLOAT", key, "compute_s", round(took, 6))]
        if self.images:
            commands.append(("HINCRBY", key, "images", self.images))
        if self.kind == "finetune" and self.step_seconds:
            commands.append(("HINCRBY", key, "finetune_steps", len(self.step_seconds)))
        return commands

    def publish(self, data: dict, event: str = "progress") -> None:
        """Record an event and check whether the job must stop here (cancelled, lost, past its time limit)."""
        self._events.append((event, data))
        if event != "progress":
            self.flush()
        else:
            self._receive()  # the last batch's reply: it arrived while this step ran
            # the first step goes out at once (a listener sees the job move), then a batch every PUBLISH_EVERY_S
            if self._sent_at is None or time.perf_counter() - self._sent_at >= PUBLISH_EVERY_S:
                self._send()
                if self._step_s >= WAIT_AFTER_STEP_S:
                    self._receive()
        if event == "progress" and self._progress_hook:  # after the batch: the hash holds this step's progress
            note_progress(self.store.r, self.id)
        done = event == "progress" and data.get("step") == data.get("total")
        self._raise_if_stopping(*self.flags, done=done)

    def emit(self, data: dict, event: str) -> None:
        """Record an event that goes out with the next batch (at the latest when the run ends); no checks."""
        self._events.append((event, data))

    def flush(self, extra: list[tuple] = ()) -> None:
        """Send every event recorded so far and wait until Redis has them."""
        self._send(extra)
        self._receive()

    def _send(self, extra: list[tuple] = ()) -> None:
        events, self._events = self._events, []
        self._sent_at = time.perf_counter()
        if not (events or extra):
            return
        try:
            flags = self._channel.send(events, extra)
        except Exception:  # Redis unreachable: keep the events for the next batch
            log.warning("publishing events of %s failed", self.id, exc_info=True)
            self._events = (events + self._events)[-KEEP_UNSENT_EVENTS:]
            return
        if flags is not None:
            self.flags = flags

    def _receive(self) -> None:
        try:
            flags = self._channel.receive()
        except Exception:
            log.warning("publishing events of %s failed", self.id, exc_info=True)
            return
        if flags is not None:
            self.flags = flags

    def _raise_if_stopping(self, cancel: bool, owned: bool, *, done: bool = False) -> None:
        if cancel:
            raise Stop("cancelled")
        if self.lost or not owned:
            raise Stop("lost")
        # a step can't be interrupted, so the limit is checked between steps; after the last one the work is done
        # (admission refused what was estimated not to fit), so it is not thrown away
        if time.monotonic() > self.deadline and not done:
            raise Stop("time_limit")
        if lifecycle.shutting_down():
            raise Stop("shutdown")
        if self._should_yield():
            raise Stop("yield")

    def _should_yield(self) -> bool:
        """A fine-tune gives way when image requests wait for this worker (see WorkerSettings.yield_*). The queue's
        count is read at most every YIELD_CHECK_S: one HMGET, next to a training step."""
        s = self.settings
        if self.kind != "finetune" or not s.yield_to_generate or "generate" not in lifecycle.queues():
            return False
        now = time.monotonic()
        if now - self._yield_checked < YIELD_CHECK_S:
            return False
        self._yield_checked = now
        if now - self._running_since < s.yield_min_interval_s:
            return False
        waiting, _ = self.store.queued("generate")
        if not waiting:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
        return now - self._waiting_since >= s.yield_after_s


def _worker_name() -> str:
    return f"{lifecycle.node_name()}/{os.getpid()}"


def run_job(job_id: str, body: Callable[[JobRun], dict]) -> str | None:
    """Run one job to its final state (or back to its queue); returns why it stopped early (`Stop.reason`) or
    None."""
    settings, store, worker = get_worker_settings(), lifecycle.get_store(), _worker_name()
    job = claim(store, job_id, worker, settings)
    if job is None:
        return None
    try:
        with JobRun(store, job, worker, settings) as run:
            result = body(run)
    except Exception as e:  # noqa: BLE001 - the job's final state says what it means (conclude logs the rest)
        conclude(store, job, worker, settings, error=e)
        return e.reason if isinstance(e, Stop) else None
    conclude(store, job, worker, settings, result=result)
    return None


def claim(store: JobStore, job_id: str, worker: str, settings: WorkerSettings, outcome: Claim | None = None
          ) -> dict | None:
    """Claim a job for this run (or act on a claim already made): its record, or None when it is not this run's to
    do (ended, another worker has it: a duplicate delivery; or it ends here: cancelled, out of attempts)."""
    c = outcome or store.claim(job_id, worker, stale_after_s=settings.stale_after_s,
                               max_attempts=settings.max_attempts)
    if c.outcome in ("cancel", "exhausted"):
        error = "" if c.outcome == "cancel" else (
            f"gave up after {c.detail} attempts: the worker running it stopped each time")
        store.finish(job_id, "cancelled" if c.outcome == "cancel" else "failed", error=error)
        lifecycle.release_resources(store, store.get(job_id))
        return None
    if c.outcome != "run":  # missing / already finished / another worker has it: a duplicate delivery
        log.info("job %s: not running it (%s %s)", job_id, c.outcome, c.detail)
        return None
    job = store.get(job_id)
    if job is None:  # expired the moment it was claimed
        return None
    log.info("job %s (%s) attempt %s on %s", job_id, job["kind"], c.detail, worker)
    return job


def conclude(store: JobStore, job: dict, worker: str, settings: WorkerSettings, *, result: dict | None = None,
             error: BaseException | None = None) -> None:
    """The job's final state after its run (or its way back to the queue), from its result or what stopped it."""
    job_id = job["id"]
    if isinstance(error, Stop):
        if error.reason == "lost":
            log.warning("job %s: another worker took it over; stopping here", job_id)
            return
        if error.reason in ("shutdown", "yield"):
            why = "worker shutting down" if error.reason == "shutdown" else "yielding to waiting image requests"
            if store.requeue(job_id, worker, why):
                log.warning("job %s: %s; back in the queue", job_id, why)
                store.list_batchable(job)
                try:
                    lifecycle.enqueue(job["kind"], job_id)
                    store.mark_enqueued(job_id)
                except Exception:  # the reconciler enqueues a job that was never enqueued
                    log.warning("job %s: could not enqueue it again", job_id, exc_info=True)
            return  # still the job's: its adapter name stays held
        if error.reason == "cancelled":
            store.finish(job_id, "cancelled")
        else:
            store.finish(job_id, "failed", error=f"time limit exceeded ({settings.time_limit_s(job['kind'])} s)")
    elif isinstance(error, InvalidInput):  # bad input the API could not see (e.g. a dataset the trainer rejects)
        store.finish(job_id, "failed", error=f"{api_name(error.field)}: {error.message}")
    elif isinstance(error, ValueError):
        store.finish(job_id, "failed", error=str(error))
    elif error is not None:  # the job fails; the worker lives on; the details (paths, hosts) stay in its log
        log.error("job %s failed", job_id, exc_info=error)
        store.finish(job_id, "failed", error=f"internal error ({type(error).__name__}); the worker's log has the "
                     "details")
    else:
        store.finish(job_id, "succeeded", result=result)
    _count_ended(store, job)
    lifecycle.release_resources(store, job)


def _count_ended(store: JobStore, job: dict) -> None:
    """Usage: jobs of this key by kind and final state (GET /usage)."""
    state = store.r.hget(job_key(job["id"]), "state")  # the state only, not the whole record
    if state in TERMINAL:
        store.r.hincrby(usage_key(job["owner"]), f"jobs:{job['kind']}:{state}", 1)
