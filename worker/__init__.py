"""Celery workers: the only place where the model (`minidalle`) meets the queue.

`tasks` (thin task bodies: request → library call → files on the volume), `run` (one claimed run: heartbeat, events,
stop checks, final state), `runtime` (the resident pipeline, loaded lazily in the worker process), `lifecycle`
(presence, reconciler, janitor schedule), `janitor`, `health`. The job contract it shares with the API is `jobs/`;
it never imports `service/`.
"""
