"""The Celery tasks: thin. The argument is the job id; the request is in the job record; the work is the library's.

A task may run more than once (at-least-once delivery, a reconciler re-enqueue): `JobStore.claim` lets one run own
the job, outputs are keyed by job id and renamed into place, and a fine-tune resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from minidalle import Cancelled
from worker import janitor, lifecycle
from worker.celery_app import FINETUNE_TASK, GENERATE_TASK, app, enqueue
from worker.jobs import EventChannel, JobStore, adapter_url, image_url
from worker.metrics import StepTimings
from worker.runtime import activate_adapter, get_pipeline
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)
# Progress events go to Redis in batches, at most this often (SSE still gets one event per step).
PUBLISH_EVERY_S = 0.1
# After a step at least this long, wait for the batch's reply at once (a round trip is nothing next to it), so a
# cancel is seen at the very next step instead of one step later.
WAIT_AFTER_STEP_S = 0.5
KEEP_UNSENT_EVENTS = 10_000  # while Redis is unreachable, the newest events wait for the next batch


class Stop(Cancelled):  # noqa: N818 - a Cancelled, so the trainer saves a checkpoint before it propagates
    """Why a running job must stop at this step: cancelled, lost (another worker took it over), time_limit."""

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
        limit = settings.generate_time_limit_s if self.kind == "generate" else settings.finetune_time_limit_s
        self.deadline = time.monotonic() + limit
        self.timings = StepTimings(self.kind)
        self.lost = False
        self.flags = (False, True)  # (cancel requested, still owned), as of the last batch's reply
        self._last = time.perf_counter()
        self._step_s = 0.0  # how long the last step took
        self._sent_at = 0.0  # perf_counter of the last batch sent
        self._events: list[tuple[str, dict]] = []
        self._channel = EventChannel(store, self.id, worker)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.id}", daemon=True)

    def __enter__(self) -> JobRun:
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.flush(extra=self.timings.commands())
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
            except Exception:  # noqa: BLE001 - Redis blips: the next beat retries
                log.warning("heartbeat for %s failed", self.id, exc_info=True)

    def step_done(self) -> float:
        now = time.perf_counter()
        self._step_s, self._last = now - self._last, now
        self.timings.add(self._step_s)
        return self._step_s

    def publish(self, data: dict, event: str = "progress") -> None:
        """Record an event and check whether the job must stop here (cancelled, lost, past its time limit)."""
        self._events.append((event, data))
        if event != "progress":
            self.flush()
        else:
            self._receive()  # the last batch's reply: it arrived while this step ran
            if time.perf_counter() - self._sent_at >= PUBLISH_EVERY_S:
                self._send()
                if self._step_s >= WAIT_AFTER_STEP_S:
                    self._receive()
        self._raise_if_stopping(*self.flags)

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
        except Exception:  # noqa: BLE001 - Redis unreachable: keep the events for the next batch
            log.warning("publishing events of %s failed", self.id, exc_info=True)
            self._events = (events + self._events)[-KEEP_UNSENT_EVENTS:]
            return
        if flags is not None:
            self.flags = flags

    def _receive(self) -> None:
        try:
            flags = self._channel.receive()
        except Exception:  # noqa: BLE001
            log.warning("publishing events of %s failed", self.id, exc_info=True)
            return
        if flags is not None:
            self.flags = flags

    def _raise_if_stopping(self, cancel: bool, owned: bool) -> None:
        if cancel:
            raise Stop("cancelled")
        if self.lost or not owned:
            raise Stop("lost")
        if time.monotonic() > self.deadline:
            raise Stop("time_limit")
        if lifecycle.shutting_down():
            raise Stop("shutdown")


def _worker_name() -> str:
    return f"{lifecycle.node_name()}/{os.getpid()}"


def run_job(job_id: str, body: Callable[[JobRun], dict]) -> None:
    settings = get_worker_settings()
    store = lifecycle.get_store()
    worker = _worker_name()
    claim = store.claim(job_id, worker, stale_after_s=settings.stale_after_s, max_attempts=settings.max_attempts)
    if claim.outcome in ("cancel", "exhausted"):
        error = "" if claim.outcome == "cancel" else (
            f"gave up after {claim.detail} attempts: the worker running it stopped each time")
        store.finish(job_id, "cancelled" if claim.outcome == "cancel" else "failed", error=error)
        lifecycle.release_resources(store, store.get(job_id))
        return
    if claim.outcome != "run":  # missing / already finished / another worker has it: a duplicate delivery
        log.info("job %s: not running it (%s %s)", job_id, claim.outcome, claim.detail)
        return
    job = store.get(job_id)
    log.info("job %s (%s) attempt %s on %s", job_id, job["kind"], claim.detail, worker)
    try:
        with JobRun(store, job, worker, settings) as run:
            result = body(run)
    except Stop as e:
        if e.reason == "lost":
            log.warning("job %s: another worker took it over; stopping here", job_id)
            return
        if e.reason == "shutdown":
            if store.requeue(job_id, worker, "worker shutting down"):
                log.warning("job %s: worker shutting down; back in the queue", job_id)
                try:
                    enqueue(job["kind"], job_id)
                    store.mark_enqueued(job_id)
                except Exception:  # noqa: BLE001 - the reconciler enqueues a job that was never enqueued
                    log.warning("job %s: could not enqueue it again", job_id, exc_info=True)
            return  # still the job's: its adapter name stays held
        if e.reason == "cancelled":
            store.finish(job_id, "cancelled")
        else:
            limit = settings.generate_time_limit_s if job["kind"] == "generate" else settings.finetune_time_limit_s
            store.finish(job_id, "failed", error=f"time limit exceeded ({limit} s)")
    except ValueError as e:  # bad input the API could not see (e.g. a dataset the trainer rejects)
        store.finish(job_id, "failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - the job fails with the reason; the worker lives on
        log.exception("job %s failed", job_id)
        store.finish(job_id, "failed", error=f"{type(e).__name__}: {e}")
    else:
        store.finish(job_id, "succeeded", result=result)
    lifecycle.release_resources(store, job)


@app.task(name=GENERATE_TASK)
def generate(job_id: str) -> None:
    run_job(job_id, _generate)


@app.task(name=FINETUNE_TASK)
def finetune(job_id: str) -> None:
    run_job(job_id, _finetune)


def _generate(run: JobRun) -> dict:
    from minidalle.png import save_png

    settings, req = run.settings, run.job["request"]
    pipe = get_pipeline(settings)
    adapters = [(activate_adapter(pipe, settings.data_dir, a["name"]), a["scale"]) for a in req["adapters"]]

    def on_step(step: int, total: int) -> None:
        took = run.step_done()
        run.publish({"step": step, "total": total, "eta_s": round(took * (total - step), 3)})

    t0 = time.perf_counter()
    out = pipe(req["prompt"], negative_prompt=req.get("negative_prompt"),
               num_inference_steps=req["num_inference_steps"], guidance_scale=req["guidance_scale"],
               height=req.get("height"), width=req.get("width"), num_images_per_prompt=req["num_images"],
               seed=req["seed"], scheduler=req.get("scheduler"), adapters=adapters, callback=on_step)
    log.info("job %s: pipeline %.3f s", run.id, time.perf_counter() - t0)
    images_dir = settings.data_dir / "jobs" / run.id / "images"
    images = []
    for i, (image, meta) in enumerate(zip(out.images, out.metadata, strict=True)):
        save_png(image, images_dir / f"{i}.png", meta)  # temp file + rename
        images.append({"index": i, "url": image_url(run.id, i), "seed": meta.get("seed"), "metadata": meta})
        run.emit({"index": i, "url": image_url(run.id, i), "seed": meta.get("seed")}, event="image")
    return {"images": images}


def _finetune(run: JobRun) -> dict:
    from minidalle.trainer import TrainConfig, train

    settings, req = run.settings, run.job["request"]
    dataset_dir = settings.data_dir / "datasets" / req["dataset_id"]
    if not dataset_dir.is_dir():
        raise ValueError(f"dataset_id: dataset {req['dataset_id']!r} not found")
    janitor.mark_used(dataset_dir)
    job_dir = settings.data_dir / "jobs" / run.id
    out_dir = job_dir / "adapter"  # written by the trainer, renamed into adapters/{name} at the end
    final = settings.data_dir / "adapters" / req["name"]
    result = {"adapter": {"name": req["name"], "url": adapter_url(req["name"]),
                          "download_url": adapter_url(req["name"]) + "/download"}}
    marker = job_dir / "published"  # written just before the rename: "this job's adapter is (being) published"
    if marker.is_file():  # a re-delivery after this job published, or died between marker and rename
        if out_dir.is_dir() and not final.exists():
            os.rename(out_dir, final)
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
        return result
    if not _finished_adapter(out_dir, req["steps"]):
        config = TrainConfig(
            dataset_dir=str(dataset_dir), output_dir=str(out_dir), work_dir=str(job_dir),
            model=settings.model or None, steps=req["steps"], learning_rate=req["learning_rate"], rank=req["rank"],
            alpha=req["alpha"], dropout=req["dropout"], batch_size=req["batch_size"], grad_accum=req["grad_accum"],
            resolution=req.get("resolution"), train_prior=req["train_prior"],
            validation_prompts=list(req["validation_prompts"]),
            # about ten checkpoints per run when not given: a dead worker loses at most a tenth of the work
            checkpoint_every=req.get("checkpoint_every") or max(1, req["steps"] // 10),
            seed=req["seed"], resume=True,
        )
        train(config, on_progress=lambda event: _train_event(run, job_dir, event), pipeline=get_pipeline(settings))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise ValueError(f"name: adapter {req['name']!r} already exists; this job's adapter stays in {out_dir} "
                         "until the job expires")
    marker.write_text(req["name"])
    os.rename(out_dir, final)
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)  # published: nothing left to resume
    return result


def _finished_adapter(out_dir: Path, steps: int) -> bool:
    import json

    try:
        return json.loads((out_dir / "adapter.json").read_text()).get("steps") == steps
    except (OSError, ValueError):
        return False


def _train_event(run: JobRun, job_dir: Path, event: dict) -> None:
    kind = event.get("type")
    if kind == "progress":
        run.step_done()
        data = {k: event.get(k) for k in ("step", "total", "loss", "lr", "eta_s")}
        run.publish(data)
    elif kind == "checkpoint":
        run.publish({"step": event["step"], "total": event["total"]}, event="checkpoint")
    elif kind == "validation":
        urls = []
        for p in event.get("images", []):
            rel = Path(p).relative_to(job_dir / "validation")
            urls.append(f"/jobs/{run.id}/validation/{rel.as_posix()}")
        run.publish({"step": event["step"], "total": event["total"], "images": urls}, event="validation")
