"""The Celery app. Importable without torch: the API uses it to enqueue tasks by name.

    celery -A worker.celery_app worker -Q generate,finetune --pool=solo
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.settings import get_worker_settings

GENERATE_TASK = "minidalle.generate"
FINETUNE_TASK = "minidalle.finetune"
QUEUES = ("generate", "finetune")
TASK_QUEUE = {GENERATE_TASK: "generate", FINETUNE_TASK: "finetune"}


def make_app() -> Celery:
    s = get_worker_settings()
    app = Celery("minidalle", broker=s.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
        task_routes={name: {"queue": q} for name, q in TASK_QUEUE.items()},
        task_default_queue="generate",
        # Status lives in our own job records (worker.jobs); Celery's result backend is not used.
        task_ignore_result=True,
        # At-least-once delivery: ack after the task ran, re-deliver when the worker process dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": s.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # No task_annotations time limits: the solo pool ignores them. Jobs enforce their own limits at every
        # step (worker.tasks.JobRun), which also ends them cleanly (a fine-tune saves a checkpoint).
    )
    return app


app = make_app()
celery = app  # `celery -A worker.celery_app` finds either name


def enqueue(kind: str, job_id: str) -> None:
    """Send the task for a job by name (task id = job id); never imports the task code."""
    name = GENERATE_TASK if kind == "generate" else FINETUNE_TASK
    app.send_task(name, args=[job_id], task_id=job_id, queue=TASK_QUEUE[name])
