"""The queue both sides share: Celery over Redis, the task names, and `enqueue`. Torch-free.

The API builds a producer-only app (`make_app(settings)`) and sends tasks by name; the workers build theirs with
the task code included (`worker.celery_app`). Neither imports the other. Each kind of job has its task; the queue
a kind runs on is `jobs.kinds.QUEUE_OF` (an import runs on the generate queue).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from jobs.kinds import QUEUES, queue_of
from jobs.settings import CommonSettings

GENERATE_TASK = "minidalle.generate"
FINETUNE_TASK = "minidalle.finetune"
IMPORT_TASK = "minidalle.import_adapter"
TASK_FOR_KIND = {"generate": GENERATE_TASK, "finetune": FINETUNE_TASK, "import": IMPORT_TASK}
TASK_QUEUE = {task: queue_of(kind) for kind, task in TASK_FOR_KIND.items()}
__all__ = ["FINETUNE_TASK", "GENERATE_TASK", "IMPORT_TASK", "QUEUES", "TASK_FOR_KIND", "TASK_QUEUE", "enqueue",
           "make_app", "queue_depth", "revoke"]


def make_app(settings: CommonSettings, *, include: tuple[str, ...] = ()) -> Celery:
    app = Celery("minidalle", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
        task_routes={name: {"queue": q} for name, q in TASK_QUEUE.items()},
        task_default_queue="generate",
        # Status lives in our own job records (jobs.store); Celery's result backend is not used.
        task_ignore_result=True,
        # At-least-once delivery: ack after the task ran, re-deliver when the worker process dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # pool=solo runs one task at a time, and Celery reserves concurrency x multiplier messages: left at its
        # default (the CPU count) a worker would hold messages other workers could run, and take the next one before
        # it reads a revoke (`celery control revoke`) sent while it was busy
        worker_concurrency=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # No task_annotations time limits: the solo pool ignores them. Jobs enforce their own limits at every
        # step (worker.run.JobRun), which also ends them cleanly (a fine-tune saves a checkpoint).
    )
    return app


def enqueue(app: Celery, kind: str, job_id: str) -> None:
    """Send the task for a job by name (task id = job id); never imports the task code."""
    name = TASK_FOR_KIND[kind]
    app.send_task(name, args=[job_id], task_id=job_id, queue=TASK_QUEUE[name])


def revoke(app: Celery, job_id: str) -> None:
    """Drop a queued job's message early (its record already says cancelled; a worker would skip it anyway)."""
    app.control.revoke(job_id)


def queue_depth(client, queue: str) -> int:
    """Messages waiting in a queue: kombu's Redis transport keeps priority levels in sibling lists."""
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
    return sum(client.llen(k) for k in keys)
