"""Throughput of one generate worker under concurrent clients, with dynamic batching on vs off.

    python bench/batching.py [--clients 16] [--requests 4] [--steps 25] [--max-images 8] [--wait-ms 5]
                             [--rounds 1] [--threads 1]

Each run starts a fresh stack (redis-server, uvicorn, one Celery worker on the `generate` queue, the embedded
model). `--clients` threads each send `--requests` `POST /generate?wait=` one after the other (every request its own
prompt and seed, the same steps and size, so all may share a batch). `on` lets the worker batch up to
`--max-images` images, waiting at most `--wait-ms`; `off` sets MINIDALLE_BATCH_MAX_IMAGES=1. The modes alternate
for `--rounds`; the medians are compared. Prints images/s, p50/p95 latency and the mean batch per mode, and the
throughput ratio. Goal: >= 1.8x images/s with batching.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the process helpers the tests use

GOAL = 1.8


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def one_run(mode: str, args, round_no: int) -> dict:
    import httpx
    from _support.servers import Stack

    env = {"MINIDALLE_BATCH_MAX_IMAGES": str(args.max_images if mode == "on" else 1),
           "MINIDALLE_BATCH_WAIT_MS": str(args.wait_ms), "MINIDALLE_TORCH_THREADS": str(args.threads),
           "MINIDALLE_HEARTBEAT_INTERVAL_S": "5", "MINIDALLE_STALE_AFTER_S": "30"}
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp) / mode, workers={"w1": "generate"}, **env)
        try:
            latencies: list[float] = []
            batches: list[int] = []
            errors: list[str] = []
            lock = threading.Lock()

            def client(c: int) -> None:
                with httpx.Client(base_url=stack.base_url, timeout=600) as http:
                    for i in range(args.requests):
                        body = {"prompt": f"a red circle {c} {i}", "seed": 1000 * c + i,
                                "num_inference_steps": args.steps}
                        t0 = time.perf_counter()
                        r = http.post("/generate", params={"wait": 120}, json=body)
                        took = time.perf_counter() - t0
                        with lock:
                            if r.status_code != 200 or r.json()["job"]["state"] != "succeeded":
                                errors.append(r.text[:200])
                                continue
                            latencies.append(took)
                            batches.append(r.json()["job"]["result"]["batch"]["jobs"])

            threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if errors:
                raise SystemExit(f"{len(errors)} requests failed in mode {mode}: {errors[:3]}")
            out = {"mode": mode, "round": round_no, "images": len(latencies), "wall_s": round(wall, 2),
                   "images_per_s": round(len(latencies) / wall, 3), "p50_s": round(statistics.median(latencies), 3),
                   "p95_s": round(p95(latencies), 3), "mean_batch_jobs": round(statistics.mean(batches), 2),
                   "max_batch_jobs": max(batches)}
            print(json.dumps(out), flush=True)
            return out
        finally:
            stack.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max-images", type=int, default=8, help="MINIDALLE_BATCH_MAX_IMAGES when batching")
    ap.add_argument("--wait-ms", type=float, default=5.0, help="MINIDALLE_BATCH_WAIT_MS")
    ap.add_argument("--rounds", type=int, default=1, help="on/off pairs, alternated")
    ap.add_argument("--threads", type=int, default=1, help="MINIDALLE_TORCH_THREADS of the worker")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            runs[mode].append(one_run(mode, args, r))

    def med(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode])

    ratio = med("on", "images_per_s") / med("off", "images_per_s")
    print(f"{args.clients} clients x {args.requests} requests, {args.steps} steps: batching on "
          f"{med('on', 'images_per_s'):.2f} images/s (p50 {med('on', 'p50_s'):.2f} s, p95 {med('on', 'p95_s'):.2f} s, "
          f"mean batch {med('on', 'mean_batch_jobs'):.1f} jobs), off {med('off', 'images_per_s'):.2f} images/s "
          f"(p50 {med('off', 'p50_s'):.2f} s, p95 {med('off', 'p95_s'):.2f} s)")
    print(f"{'PASS' if ratio >= GOAL else 'FAIL'}: {ratio:.2f}x images/s with batching (goal >= {GOAL}x)")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
