"""What the service adds to one generation: end-to-end `POST /generate?wait=` (HTTP → Redis → Celery worker →
PNG on the volume → GET the PNG) against the same request run in-process (pipeline call + PNG write).

    python bench/service_overhead.py [--rounds 3] [--runs 15] [--steps 25] [--size 0] [--threads 1] [--model PATH]

Real processes (redis-server, `celery worker --pool=solo`, uvicorn), the embedded model by default, medians over
repeated runs after a warm-up. Goal: overhead ≤ 5 %. The path has no polling sleeps: the worker blocks on the
queue (BRPOP) and the waiting request waits on the API's event hub (one XREAD for every listener).

Both sides run in processes of their own, started fresh for each round: the same pipeline call runs a few percent
faster or slower in one process than in another (memory layout; measured ±3 % between identical processes on the
2-core dev VM), so one worker against one baseline process would measure that luck. Several rounds, each a new
worker and a new baseline process with interleaved requests, pool it out; the per-round numbers are printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the process helpers the tests use

from _support.servers import Stack  # noqa: E402


def request_body(args) -> dict:
    body = {"prompt": "a red circle on a blue background", "num_inference_steps": args.steps, "seed": 1,
            "guidance_scale": 7.5}
    if args.size:
        body.update(width=args.size, height=args.size)
    return body


GOAL_PCT = 5.0


def baseline_main(args) -> int:
    """`--baseline`: the in-process side, in a process of its own. Reads one line per request on stdin, runs the
    pipeline call + PNG write, prints the seconds it took."""
    import torch

    from minidalle import MiniDallePipeline
    from minidalle.png import save_png

    torch.set_num_threads(args.threads)
    pipe = MiniDallePipeline.from_pretrained(args.model or None)
    body = request_body(args)
    out_dir = Path(args.baseline)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("ready", flush=True)
    for i, _ in enumerate(sys.stdin):
        t0 = time.perf_counter()
        out = pipe(body["prompt"], num_inference_steps=body["num_inference_steps"], seed=body["seed"],
                   guidance_scale=body["guidance_scale"], height=body.get("height"), width=body.get("width"))
        save_png(out.images[0], out_dir / f"{i}.png", out.metadata[0])
        print(time.perf_counter() - t0, flush=True)
    return 0


class InProcess:
    """The baseline: the same pipeline call and PNG write, in a fresh process (see the module docstring)."""

    def __init__(self, args, out_dir: Path):
        cmd = [sys.executable, __file__, "--baseline", str(out_dir), "--steps", str(args.steps), "--size",
               str(args.size), "--threads", str(args.threads), "--model", args.model]
        out_dir.mkdir(parents=True)
        self.log = open(out_dir / "baseline.log", "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        for line in self.proc.stdout:  # whatever a library prints while loading comes before "ready"
            if line.strip() == "ready":
                break
        else:
            self.log.seek(0)
            raise RuntimeError(f"the baseline process did not start (exit code {self.proc.wait()}):\n"
                               + self.log.read()[-3000:])

    def run(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def end_to_end(stack: Stack, body: dict) -> tuple[float, dict]:
    """One request that waits for the image, then the PNG fetched; also the job's own timestamps."""
    t0, wall0 = time.perf_counter(), time.time()
    r = stack.http.post("/generate", params={"wait": 60}, json=body)
    job = r.json()["job"]
    assert r.status_code == 200 and job["state"] == "succeeded", r.text
    png = stack.http.get(job["result"]["images"][0]["url"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    took = time.perf_counter() - t0
    parts = {"api_to_record": job["created_at"] - wall0, "queue_to_worker": job["started_at"] - job["created_at"],
             "worker": job["finished_at"] - job["started_at"], "record_to_client": took - (job["finished_at"] - wall0)}
    return took, parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh worker + baseline process pairs")
    ap.add_argument("--runs", type=int, default=15, help="interleaved request pairs per round")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=0, help="width = height; 0: the model's native size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same in both setups")
    ap.add_argument("--model", default="", help="model folder or hub id (default: embedded)")
    ap.add_argument("--baseline", default="", help=argparse.SUPPRESS)  # internal: run as the baseline process
    args = ap.parse_args(argv)
    if args.baseline:
        return baseline_main(args)
    body = request_body(args)
    local_times, e2e_times, parts, per_round = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MINIDALLE_TORCH_THREADS": str(args.threads), "MINIDALLE_MODEL": args.model,
               "MINIDALLE_MAX_STEPS": str(max(150, args.steps)),
               # production periods, not the tests' fast ones
               "MINIDALLE_HEARTBEAT_INTERVAL_S": "5", "MINIDALLE_STALE_AFTER_S": "30",
               "MINIDALLE_RECONCILE_INTERVAL_S": "10"}
        stack = Stack(Path(tmp) / "stack", **env)
        try:
            for r in range(args.rounds):
                worker = stack.add_worker(f"bench{r}", "generate")
                local = InProcess(args, Path(tmp) / f"local{r}")
                try:
                    local.run(), end_to_end(stack, body)  # warm-up: first-call costs on both sides
                    loc, e2e = [], []
                    for _ in range(args.runs):  # interleaved, so load from elsewhere hits both alike
                        loc.append(local.run())
                        took, p = end_to_end(stack, body)
                        e2e.append(took)
                        parts.append(p)
                finally:
                    local.close()
                    worker.stop()
                local_times += loc
                e2e_times += e2e
                per_round.append(round(100 * (statistics.median(e2e) / statistics.median(loc) - 1), 1))
        finally:
            stack.stop()
    med_local, med_e2e = statistics.median(local_times), statistics.median(e2e_times)
    pct = 100 * (med_e2e / med_local - 1)
    result = {"rounds": args.rounds, "runs_per_round": args.runs, "steps": args.steps,
              "in_process_median_s": round(med_local, 4), "end_to_end_median_s": round(med_e2e, 4),
              "overhead_s": round(med_e2e - med_local, 4), "overhead_pct": round(pct, 1),
              "overhead_pct_per_round": per_round,
              "median_parts_ms": {k: round(1000 * statistics.median(p[k] for p in parts), 1) for k in parts[0]}}
    print(json.dumps(result))
    print(f"service overhead {pct:.1f} % (goal <= {GOAL_PCT:.0f} %): {'PASS' if pct <= GOAL_PCT else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
