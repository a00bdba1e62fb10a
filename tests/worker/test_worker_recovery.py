"""Failure handling with real processes: a worker killed mid fine-tune, a queued job cancelled, a job recorded but
never enqueued, a job that keeps killing its workers."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _support.fixtures import shapes_dataset_zip, sse_events, wait_job
from _support.servers import Stack, wait_until

from jobs.store import JobStore


@pytest.fixture(scope="module")
def finetune_stack(tmp_path_factory):
    """No generate worker at all (so generate jobs stay queued); fine-tune workers are added per test."""
    s = Stack(tmp_path_factory.mktemp("recovery"), workers={})
    from _support import fixtures

    fixtures._STACKS.append(s)
    yield s
    fixtures._STACKS.remove(s)
    s.stop()


_CANCELLED_QUEUED: list[str] = []


def _store(stack) -> JobStore:
    return JobStore(stack.redis, ttl_s=3600, events_maxlen=10_000)


def test_cancel_queued_generate_never_starts(finetune_stack):
    s = finetune_stack
    ready = s.http.get("/readyz")  # no worker yet: not ready, and it says which queues lack one
    assert ready.status_code == 503
    assert ready.json()["workers_ready"] == {"generate": 0, "finetune": 0}
    assert "generate, finetune" in ready.json()["detail"]
    r = s.http.post("/generate", json={"prompt": "a cat", "num_inference_steps": 2})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    assert s.redis.llen("generate") == 1  # the message waits in the queue: no generate worker here
    c = s.http.post(f"/jobs/{job_id}/cancel")
    assert c.status_code == 202 and c.json()["state"] == "cancelled", c.text
    events = sse_events(s.http, f"/jobs/{job_id}/events", timeout=10)
    assert [e[0] for e in events] == ["queued", "cancelled"]
    job = s.http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["started_at"] is None and job["attempts"] == 0
    _CANCELLED_QUEUED.append(job_id)  # a later test starts a worker: it must not run this one


def test_waiting_requests_hold_no_api_threads(finetune_stack):
    """`POST /generate?wait=` waits on Redis, not in one of the API's 40 threadpool threads: with 60 clients
    waiting (no generate worker here, so none of them finishes), a route that runs in a thread answers at once."""
    s = finetune_stack
    n, queued_before = 60, s.redis.llen("generate")
    body = {"prompt": "a cat", "num_inference_steps": 2}
    limits = httpx.Limits(max_connections=n + 5, max_keepalive_connections=n + 5)
    with httpx.Client(base_url=s.base_url, timeout=30, limits=limits) as c, ThreadPoolExecutor(n) as pool:
        waiting = [pool.submit(c.post, "/generate", params={"wait": 5}, json=body) for _ in range(n)]
        wait_until(lambda: s.redis.llen("generate") >= queued_before + n, 10, "every request queued its job")
        listed = c.get("/jobs", params={"state": "queued", "limit": 500})  # a plain `def` route: needs a thread
        assert not any(f.done() for f in waiting), "the listing had to wait for the waiting requests"
        assert listed.status_code == 200
        answers = [f.result() for f in waiting]
    assert [a.status_code for a in answers] == [202] * n  # the wait ran out: still queued
    ids = {a.json()["job_id"] for a in answers}
    assert ids <= {j["id"] for j in listed.json()["jobs"]}
    for job_id in ids:
        assert s.http.post(f"/jobs/{job_id}/cancel").json()["state"] == "cancelled"


def test_worker_killed_during_finetune_new_worker_resumes_from_checkpoint(finetune_stack):
    s = finetune_stack
    w1 = s.add_worker("ft1", "finetune")
    r = s.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    dataset_id = r.json()["dataset_id"]
    steps = 150
    r = s.http.post("/finetune", json={"name": "survivor", "dataset_id": dataset_id, "steps": steps,
                                       "checkpoint_every": 10})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    seen = []

    def kill_after_second_checkpoint(event):
        seen.append(event)
        if event[0] == "checkpoint" and event[2]["step"] >= 20 and w1.alive():
            w1.kill()  # SIGKILL the worker's process group mid-training: no cleanup runs
            raise StopIteration

    with pytest.raises(StopIteration):
        sse_events(s.http, f"/jobs/{job_id}/events", timeout=120, on_event=kill_after_second_checkpoint)
    killed_at = max(e[2]["step"] for e in seen if e[0] == "progress")
    assert killed_at < steps
    assert s.http.get(f"/jobs/{job_id}").json()["state"] == "running"  # nobody knows yet

    s.add_worker("ft2", "generate,finetune")  # stays up for the rest of this module
    job = wait_job(s.http, job_id, timeout=180)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    events = sse_events(s.http, f"/jobs/{job_id}/events")
    kinds = [e[0] for e in events]
    assert "requeued" in kinds and kinds.count("started") == 2
    after = events[kinds.index("requeued"):]
    first_resumed = next(e[2]["step"] for e in after if e[0] == "progress")
    # resumed right after a checkpoint (every 10 steps; the trainer announces step N's checkpoint before its
    # progress event), at or after the one we saw before the kill: not from step 1
    assert (first_resumed - 1) % 10 == 0 and 20 <= first_resumed - 1 <= killed_at + 10, (first_resumed, killed_at)
    assert s.http.get("/adapters/survivor").json()["steps"] == steps
    # the generate cancelled while queued (first test) reached this worker too, and did not run
    for cancelled in _CANCELLED_QUEUED:
        wait_until(lambda: s.redis.llen("generate") == 0, 30, "the queued message consumed")
        job = s.http.get(f"/jobs/{cancelled}").json()
        assert job["state"] == "cancelled" and job["attempts"] == 0
        assert not (s.data_dir / "jobs" / cancelled / "images").exists()


def test_recorded_but_never_enqueued_job_is_enqueued_by_reconciler(finetune_stack):
    s = finetune_stack
    store = _store(s)
    r = s.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    request = {"name": "orphan", "dataset_id": r.json()["dataset_id"], "steps": 2, "learning_rate": 1e-4, "rank": 4,
               "alpha": 4, "dropout": 0.0, "batch_size": 1, "grad_accum": 1, "resolution": None, "train_prior": True,
               "validation_prompts": [], "checkpoint_every": None, "seed": 0}
    job_id = store.create("finetune", request)  # as if the API died between the record and the enqueue
    store.r.hset(f"minidalle:job:{job_id}", "created_at", repr(time.time() - 60))  # past the grace period
    job = wait_job(s.http, job_id, timeout=120)  # worker ft2's reconciler finds it
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1


def test_job_that_keeps_killing_workers_fails_after_max_attempts(finetune_stack):
    s = finetune_stack
    store = _store(s)
    job_id = store.create("generate", {"prompt": "x"})
    store.mark_enqueued(job_id)
    key = f"minidalle:job:{job_id}"
    # two earlier attempts whose workers died (the default max_attempts is 3) and a third whose heartbeat is stale
    for _ in range(3):
        store.r.hset(key, "state", "queued")
        claim = store.claim(job_id, "dead-worker", stale_after_s=3, max_attempts=3)
        assert claim.outcome == "run"
    store.r.hset(key, "heartbeat_at", "0")
    job = wait_job(s.http, job_id, timeout=30)  # worker ft2's reconciler gives up on it
    assert job["state"] == "failed" and job["attempts"] == 3
    assert "gave up after 3 attempts" in job["error"]


def test_workers_sweep_expired_job_folders(finetune_stack):
    s = finetune_stack  # worker ft2 (started by an earlier test) runs the janitor every second (service_env)
    orphan = s.data_dir / "jobs" / ("ef" * 16)  # a job whose record expired long ago
    (orphan / "images").mkdir(parents=True)
    (orphan / "images" / "0.png").write_bytes(b"x")
    old = time.time() - 8 * 24 * 3600
    for p in (orphan / "images" / "0.png", orphan / "images", orphan):
        os.utime(p, (old, old))
    fresh = s.data_dir / "jobs" / ("cd" * 16)  # record gone too (e.g. Redis lost it), but written just now
    fresh.mkdir()
    wait_until(lambda: not orphan.exists(), 15, "the janitor removed the expired job folder")
    assert fresh.exists()
    fresh.rmdir()


def test_a_worker_told_to_stop_hands_its_finetune_back_and_the_next_one_resumes(finetune_stack):
    """SIGTERM (Ctrl-C in `minidalle serve`, `docker compose stop`): the running fine-tune checkpoints at its next
    step and goes back to the queue, not counted as an attempt; the worker exits at once instead of being killed."""
    s = finetune_stack
    r = s.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    r = s.http.post("/finetune", json={"name": "handed-back", "dataset_id": r.json()["dataset_id"], "steps": 150,
                                       "checkpoint_every": 10})
    job_id = r.json()["job_id"]
    wait_until(lambda: (s.http.get(f"/jobs/{job_id}").json().get("progress") or {}).get("step", 0) >= 25, 120,
               "the fine-tune past step 25")
    worker = s.workers["ft2"]
    worker.signal(signal.SIGTERM)
    worker.popen.wait(timeout=30)  # a step, a checkpoint and a warm shutdown: not the 20 s stop timeout + kill
    job = s.http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "queued" and job["attempts"] == 0, job
    events = sse_events(s.http, f"/jobs/{job_id}/events", timeout=5, until=lambda e: e[0] == "requeued")
    assert events[-1][2] == {"reason": "worker shutting down"}
    stopped_at = max(e[2]["step"] for e in events if e[0] == "progress")
    assert list((s.data_dir / "jobs" / job_id / "checkpoints").glob(f"step-{stopped_at:06d}"))  # saved on the way out

    s.add_worker("ft3", "finetune")
    job = wait_job(s.http, job_id, timeout=180)
    assert job["state"] == "succeeded" and job["attempts"] == 1, job
    events = sse_events(s.http, f"/jobs/{job_id}/events", timeout=10)
    after = [e[2]["step"] for e in events[[e[0] for e in events].index("requeued"):] if e[0] == "progress"]
    assert after[0] == stopped_at + 1  # resumed from the checkpoint it saved when told to stop
    s.workers["ft3"].stop()  # the next test wants its own fine-tune worker only


def test_time_limit_fails_the_job_and_keeps_the_checkpoint(finetune_stack):
    s = finetune_stack
    s.workers["ft2"].stop()  # the last test of the module: only the limited worker below takes fine-tunes now
    s.add_worker("ft-limited", "finetune", MINIDALLE_FINETUNE_TIME_LIMIT_S="1")
    r = s.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    r = s.http.post("/finetune", json={"name": "too-slow", "dataset_id": r.json()["dataset_id"], "steps": 5000,
                                       "checkpoint_every": 1000})
    job = wait_job(s.http, r.json()["job_id"], timeout=60)
    assert job["state"] == "failed" and job["error"] == "time limit exceeded (1 s)", job
    assert 0 < job["progress"]["step"] < 5000
    assert list((s.data_dir / "jobs" / job["id"] / "checkpoints").glob("step-*"))  # saved when it stopped
    assert s.http.get("/adapters/too-slow").status_code == 404
