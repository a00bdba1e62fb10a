"""`python -m worker.health`: exit 0 when a worker on this host announced (in Redis) that its model is loaded.

The container healthcheck of a worker: alive is not enough, it must be able to take a job. Torch-free.
"""

from __future__ import annotations

import socket
import sys

import redis

from jobs import presence
from worker.settings import get_worker_settings


def main() -> int:
    host = socket.gethostname()
    try:
        client = redis.Redis.from_url(get_worker_settings().broker_url, decode_responses=True, socket_timeout=3)
        mine = [w for w in presence.workers(client) if w.get("name", "").endswith("@" + host)]
    except redis.RedisError as e:
        print(f"unhealthy: redis: {e}", file=sys.stderr)
        return 1
    if not any(w.get("state") == "ready" for w in mine):
        print(f"unhealthy: no ready worker on {host} (found {[w.get('state') for w in mine]})", file=sys.stderr)
        return 1
    print(f"ok: {', '.join(w['name'] for w in mine)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
