"""Step timings shared through Redis: workers add to histogram buckets, the API's /metrics reads them.

Workers are separate processes (often on other machines), so their timings live in Redis hashes
`minidalle:metrics:step:{kind}` with Prometheus-style cumulative buckets ("le:<bound>"), "count" and "sum".
Torch-free.
"""

from __future__ import annotations

import redis

from jobs.store import PREFIX

# seconds per denoising / training step: from a tiny model on a GPU (ms) to SD 1.5 training on a CPU (minutes)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def step_key(kind: str) -> str:
    return f"{PREFIX}metrics:step:{kind}"


class StepTimings:
    """Accumulates step durations in memory; `commands` adds them to Redis (sent with a job's last events)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._durations: list[float] = []

    def add(self, seconds: float) -> None:
        self._durations.append(seconds)

    def commands(self) -> list[tuple]:
        """The Redis commands that add the durations so far (and forget them here)."""
        if not self._durations:
            return []
        key = step_key(self.kind)
        commands: list[tuple] = []
        for b in BUCKETS:
            n = sum(1 for d in self._durations if d <= b)
            if n:
                commands.append(("HINCRBY", key, f"le:{b}", n))
        commands.append(("HINCRBY", key, "count", len(self._durations)))
        commands.append(("HINCRBYFLOAT", key, "sum", sum(self._durations)))
        self._durations.clear()
        return commands


def read_histogram(r: redis.Redis, kind: str) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (bound, count) pairs ending with +Inf, and the sum; as prometheus_client's families want."""
    raw = r.hgetall(step_key(kind))
    buckets = [(str(b), float(raw.get(f"le:{b}", 0))) for b in BUCKETS]
    buckets.append(("+Inf", float(raw.get("count", 0))))
    return buckets, float(raw.get("sum", 0.0))
