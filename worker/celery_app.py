"""The workers' Celery app: the shared queue configuration (`jobs.queue`) with the task code included.

    celery -A worker.celery_app worker -Q generate,finetune --pool=solo
"""

from __future__ import annotations

from jobs.queue import make_app
from worker.settings import get_worker_settings

app = make_app(get_worker_settings(), include=("worker.tasks",))
celery = app  # `celery -A worker.celery_app` finds either name
