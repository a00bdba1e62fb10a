"""The job contract the API (`service/`) and the workers (`worker/`) share. Torch-free; neither side imports the other.

- `settings`  what every process reads (Redis URL, data dir, model, job lifetimes, time limits)
- `requests`  the generate / fine-tune request bodies: validated by the API, read back by the worker
- `store`     job records in Redis (+ `lua`, their atomic transitions), listing, counts, adapter-name holds
- `events`    a running job's event stream, written without waiting on Redis
- `queue`     the Celery app factory, task names, `enqueue`
- `volume`    the data volume's layout, id rules and URLs
- `presence`  which workers are alive and ready, per queue
- `metrics`   step-time histograms the workers add to and /metrics reads
"""
