"""Worker presence in Redis: who is alive, which queues it serves, whether its model is loaded. Torch-free.

A worker keeps `minidalle:worker:{name}` fresh (TTL a few heartbeats); /readyz, `minidalle serve` and
`python -m worker.health` read it.
"""

from __future__ import annotations

import json
import time

import redis

from jobs.store import WORKER_KEY


def publish(r: redis.Redis, name: str, info: dict, ttl_s: float) -> None:
    r.set(WORKER_KEY + name, json.dumps({**info, "name": name, "seen_at": time.time()}), px=int(ttl_s * 1000))


def remove(r: redis.Redis, name: str) -> None:
    r.delete(WORKER_KEY + name)


def workers(r: redis.Redis) -> list[dict]:
    keys = list(r.scan_iter(match=WORKER_KEY + "*", count=500))
    if not keys:
        return []
    return [json.loads(v) for v in r.mget(keys) if v]


def ready_by_queue(r: redis.Redis, queues: tuple[str, ...]) -> dict[str, int]:
    """How many workers with the model loaded serve each queue."""
    return tally(workers(r), queues)


def tally(infos: list[dict], queues: tuple[str, ...]) -> dict[str, int]:
    """Ready workers per queue, from presence records (however they were read: sync or asyncio)."""
    counts = dict.fromkeys(queues, 0)
    for w in infos:
        if w.get("state") == "ready":
            for q in w.get("queues", []):
                if q in counts:
                    counts[q] += 1
    return counts
