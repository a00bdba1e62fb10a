"""Celery workers: the only place where the model (`minidalle`) meets the queue.

`worker.celery_app`, `worker.jobs` and `worker.settings` never import torch (the API imports them to enqueue
jobs); `worker.tasks` / `worker.runtime` load the model lazily, inside the worker process.
"""
