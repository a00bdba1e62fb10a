"""Dynamic batching through the service: compatible queued generate jobs run as one denoising loop on one worker,
each with its own events, files and final state; a cancel or a bad input ends one job only; a re-delivered task of
a job that ran in another's batch does nothing; the images are the ones each request makes alone."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from _support.fixtures import sse_events, wait_job
from _support.servers import Stack, wait_until
from PIL import Image

from jobs.queue import enqueue, make_app, queue_depth
from jobs.settings import CommonSettings
from jobs.store import job_key, usage_key


@pytest.fixture(scope="module")
def served_pipe():
    """The model the workers serve (the embedded default), in this process, to make each request alone."""
    from minidalle import MiniDallePipeline

    return MiniDallePipeline.from_pretrained(device="cpu")


@pytest.fixture
def queued_stack(tmp_path):
    """API and Redis; no worker until the test has queued what it needs (so what waits is known)."""
    s = Stack(tmp_path, workers={}, MINIDALLE_BATCH_MAX_IMAGES="6", MINIDALLE_BATCH_WAIT_MS="0")
    yield s
    s.stop()


def _submit(s: Stack, **body) -> str:
    r = s.http.post("/generate", json={"num_inference_steps": 4, "guidance_scale": 7.5, **body})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _png(s: Stack, url: str) -> np.ndarray:
    r = s.http.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)


def test_compatible_jobs_run_as_one_batch_with_their_own_events_files_and_states(queued_stack, served_pipe):
    s = queued_stack
    bodies = [dict(prompt="a red circle", seed=1, num_images=2), dict(prompt="a blue square", seed=2),
              dict(prompt="a green triangle", negative_prompt="red", seed=3),
              dict(prompt="a yellow circle", seed=4, num_images=2),  # 6 images so far: the batch is full
              dict(prompt="a red square", seed=5)]  # compatible, but no room: the next batch
    ids = [_submit(s, **b) for b in bodies]
    other = _submit(s, prompt="a red circle", seed=1, num_inference_steps=5)  # other steps: never with the others
    s.add_worker("w1", "generate", MINIDALLE_BATCH_MAX_IMAGES="6", MINIDALLE_BATCH_WAIT_MS="0")

    jobs = [wait_job(s.http, job_id, timeout=120) for job_id in ids + [other]]
    assert [j["state"] for j in jobs] == ["succeeded"] * 6, [(j["state"], j["error"]) for j in jobs]
    assert [j["result"]["batch"] for j in jobs[:4]] == [{"jobs": 4, "images": 6}] * 4
    assert jobs[4]["result"]["batch"]["jobs"] == 1 and jobs[5]["result"]["batch"] == {"jobs": 1, "images": 1}
    assert all(j["attempts"] == 1 for j in jobs)
    assert "batch_key" not in jobs[0]  # internal

    worst = 0
    for job_id, body, job in zip(ids, bodies, jobs, strict=False):
        events = sse_events(s.http, f"/jobs/{job_id}/events")
        steps = [e[2]["step"] for e in events if e[0] == "progress"]
        assert steps == [1, 2, 3, 4], steps  # every job of the batch sees every step
        images = [e[2] for e in events if e[0] == "image"]
        assert [i["index"] for i in images] == list(range(body.get("num_images", 1)))
        alone = served_pipe(body["prompt"], body.get("negative_prompt"), num_inference_steps=4, guidance_scale=7.5,
                          seed=body["seed"], num_images_per_prompt=body.get("num_images", 1))
        for served, made, image in zip(job["result"]["images"], alone.images, images, strict=True):
            assert served["url"] == image["url"] and served["seed"] == image["seed"]
            pixels = _png(s, served["url"])
            worst = max(worst, int(np.abs(pixels - np.asarray(made, dtype=np.int16)).max()))
    print(f"batched through the service vs made alone: max pixel difference {worst}/255")
    assert worst <= 1

    usage = s.redis.hgetall(usage_key(jobs[0]["owner"]))
    assert int(usage["images"]) == 2 + 1 + 1 + 2 + 1 + 1  # each job counts its own images

    # the Celery task of a job that ran in another's batch, delivered again: nothing happens to the job
    before = s.redis.hgetall(job_key(ids[2]))
    n_events = s.redis.xlen(f"minidalle:job:{ids[2]}:events")
    enqueue(make_app(CommonSettings(redis_url=s.redis_url)), "generate", ids[2])
    skipped = f"job {ids[2]}: not running it ("  # its own delivery said it once; this one says it again

    wait_until(lambda: (s.log_dir / "w1.log").read_text().count(skipped) == 2, 60,
               "the duplicate delivery to be seen and skipped")
    wait_until(lambda: queue_depth(s.redis, "generate") == 0, 10, "the queue to be empty")
    assert s.redis.hgetall(job_key(ids[2])) == before
    assert s.redis.xlen(f"minidalle:job:{ids[2]}:events") == n_events


def test_cancelling_one_job_of_a_batch_ends_only_that_job(queued_stack):
    s = queued_stack
    ids = [_submit(s, prompt=f"a red circle number {i}", seed=i, num_inference_steps=60) for i in range(3)]
    s.add_worker("w1", "generate", MINIDALLE_BATCH_MAX_IMAGES="6", MINIDALLE_BATCH_WAIT_MS="0")
    wait_until(lambda: (s.http.get(f"/jobs/{ids[1]}").json().get("progress") or {}).get("step", 0) >= 3, 60,
               "the batch to be running")
    assert s.http.post(f"/jobs/{ids[1]}/cancel").status_code == 202
    t0 = time.monotonic()
    cancelled = wait_job(s.http, ids[1], timeout=60)
    ended_after = time.monotonic() - t0
    assert cancelled["state"] == "cancelled"
    others = [s.http.get(f"/jobs/{i}").json() for i in (ids[0], ids[2])]
    assert all(o["state"] == "running" for o in others), others  # dropped at once, not at the batch's end
    others = [wait_job(s.http, i, timeout=120) for i in (ids[0], ids[2])]
    assert [o["state"] for o in others] == ["succeeded", "succeeded"]
    assert all(o["result"]["batch"] == {"jobs": 3, "images": 3} for o in others)
    assert not (s.data_dir / "images" / ids[1]).exists() or not any((s.data_dir / "images" / ids[1]).iterdir())
    print(f"the cancelled job of the batch ended {ended_after:.2f} s after the cancel, the others kept running")


def test_a_bad_input_fails_only_its_own_job(queued_stack):
    s = queued_stack
    ids = [_submit(s, prompt=f"a blue square {i}", seed=i) for i in range(3)]
    # input the API could not see (as if its checks had differed from the worker's model): too long a prompt
    record = json.loads(s.redis.hget(job_key(ids[1]), "request"))
    record["prompt"] = "red " * 200
    s.redis.hset(job_key(ids[1]), "request", json.dumps(record))
    s.add_worker("w1", "generate", MINIDALLE_BATCH_MAX_IMAGES="6", MINIDALLE_BATCH_WAIT_MS="0")
    jobs = [wait_job(s.http, i, timeout=120) for i in ids]
    assert [j["state"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1]["error"].startswith("prompt: ") and "tokens" in jobs[1]["error"]
    assert jobs[0]["result"]["batch"] == jobs[2]["result"]["batch"] == {"jobs": 2, "images": 2}  # the two others
    events = sse_events(s.http, f"/jobs/{ids[1]}/events")
    assert [e[0] for e in events] == ["queued", "started", "failed"]  # failed before any model work
