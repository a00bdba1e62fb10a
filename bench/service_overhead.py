"""What the service adds to one generation: end-to-end `POST /generate?wait=` (HTTP → Redis → Celery worker →
PNG on the volume → GET the PNG) against the same request run in-process (pipeline call + PNG write).

    python bench/service_overhead.py [--runs 15] [--steps 25] [--size 0] [--threads 1] [--model PATH]

Real processes (redis-server, one `celery worker --pool=solo`, uvicorn), the embedded model by default, medians
over repeated runs after a warm-up. Goal: overhead ≤ 5 %. The path has no polling sleeps: the worker blocks on the
queue (BRPOP) and the API blocks on the job's event stream (XREAD BLOCK).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


class InProcess:
    """The baseline: the same pipeline call and PNG write, in this process."""

    def __init__(self, args, out_dir: Path):
        import torch

        from minidalle import MiniDallePipeline

        torch.set_num_threads(args.threads)
        self.pipe = MiniDallePipeline.from_pretrained(args.model or None)
        self.out_dir = out_dir
        self.i = 0

    def run(self, body: dict) -> float:
        from minidalle.png import save_png

        t0 = time.perf_counter()
        out = self.pipe(body["prompt"], num_inference_steps=body["num_inference_steps"], seed=body["seed"],
                        guidance_scale=body["guidance_scale"], height=body.get("height"), width=body.get("width"))
        save_png(out.images[0], self.out_dir / f"{self.i}.png", out.metadata[0])
        self.i += 1
        return time.perf_counter() - t0


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
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=0, help="width = height; 0: the model's native size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same in both setups")
    ap.add_argument("--model", default="", help="model folder or hub id (default: embedded)")
    args = ap.parse_args(argv)
    body = request_body(args)
    with tempfile.TemporaryDirectory() as tmp:
        local = InProcess(args, Path(tmp) / "local")
        env = {"MINIDALLE_TORCH_THREADS": str(args.threads), "MINIDALLE_MODEL": args.model,
               "MINIDALLE_MAX_STEPS": str(max(150, args.steps)),
               # production periods, not the tests' fast ones
               "MINIDALLE_HEARTBEAT_INTERVAL_S": "5", "MINIDALLE_STALE_AFTER_S": "30",
               "MINIDALLE_RECONCILE_INTERVAL_S": "10"}
        stack = Stack(Path(tmp) / "stack", workers={"bench": "generate"}, **env)
        try:
            local.run(body), end_to_end(stack, body)  # warm-up: first-call costs on both sides
            local_times, e2e_times, parts = [], [], []
            for _ in range(args.runs):  # interleaved, so load from elsewhere on the machine hits both alike
                local_times.append(local.run(body))
                took, p = end_to_end(stack, body)
                e2e_times.append(took)
                parts.append(p)
        finally:
            stack.stop()
    local, e2e = local_times, e2e_times
    med_local, med_e2e = statistics.median(local), statistics.median(e2e)
    result = {"runs": args.runs, "steps": args.steps, "in_process_median_s": round(med_local, 4),
              "end_to_end_median_s": round(med_e2e, 4), "overhead_s": round(med_e2e - med_local, 4),
              "overhead_pct": round(100 * (med_e2e / med_local - 1), 1),
              "median_parts_ms": {k: round(1000 * statistics.median(p[k] for p in parts), 1) for k in parts[0]}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
