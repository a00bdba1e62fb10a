"""GET /healthz, /readyz, /metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from jobs import presence
from jobs.metrics import read_histogram
from jobs.queue import QUEUES, queue_depth
from jobs.store import JobStore
from service.deps import AdminDep, StoreDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable or a queue has no ready worker."}})
def readyz(store: StoreDep):
    """Redis answers and every queue has a worker with its model loaded."""
    try:
        store.r.ping()
        ready = presence.ready_by_queue(store.r, QUEUES)
    except Exception as e:  # noqa: BLE001 - any Redis failure means "not ready"
        log.warning("/readyz: Redis: %s", e)  # the address stays in the log, not in the answer
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    missing = [q for q, n in ready.items() if n == 0]
    body = {"status": "ok" if not missing else "unavailable", "redis": "ok", "workers_ready": ready}
    if missing:
        body["detail"] = f"no worker with the model loaded for queue(s): {', '.join(missing)}"
    return JSONResponse(body, status_code=200 if not missing else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, principal: AdminDep) -> Response:
    """Prometheus metrics: requests, jobs by kind/state, queue depth, step timings (an admin key)."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


class QueueCollector(Collector):
    """Reads the shared numbers from Redis at scrape time (workers and other API replicas write them there)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        r = self.store.r
        jobs = GaugeMetricFamily("minidalle_jobs", "Jobs by kind and state: queued/running now, and how many "
                                 "ever ended in each final state", labels=["kind", "state"])
        for (kind, state), n in self.store.counts().items():
            jobs.add_metric([kind, state], n)
        yield jobs
        depth = GaugeMetricFamily("minidalle_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for q in QUEUES:
            depth.add_metric([q], queue_depth(r, q))
        yield depth
        workers = GaugeMetricFamily("minidalle_workers_ready", "Workers with the model loaded, by queue",
                                    labels=["queue"])
        for q, n in presence.ready_by_queue(r, QUEUES).items():
            workers.add_metric([q], n)
        yield workers
        steps = HistogramMetricFamily("minidalle_step_seconds", "Duration of one denoising step (generate) or "
                                      "one optimizer step (finetune)", labels=["kind"])
        for kind in QUEUES:
            buckets, total = read_histogram(r, kind)
            steps.add_metric([kind], buckets, total)
        yield steps
