"""A Celery revoke (`celery control revoke`, Flower's Revoke) of a queued job: the worker drops its message and the
job ends as cancelled, as `POST /jobs/{id}/cancel` ends it, even while the only worker is busy; a revoked running job
runs on (with --terminate it is asked to stop)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _support import fixtures
from _support.fixtures import shapes_dataset_zip, sse_events, wait_job
from _support.servers import REPO, Stack, wait_until

from jobs.store import BATCHABLE_KEY, STATS_KEY, Bounds, events_key
from jobs.volume import Volume
from worker import lifecycle
from worker.revokes import cancel_revoked, revoked_ids


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """One worker for both queues; a fine-tune keeps it busy for as long as a test wants (no yielding)."""
    s = Stack(tmp_path_factory.mktemp("revoke"), workers={"w1": "generate,finetune"},
              MINIDALLE_YIELD_TO_GENERATE="false")
    fixtures._STACKS.append(s)
    yield s
    fixtures._STACKS.remove(s)
    s.stop()


def _celery(stack, *args: str) -> subprocess.CompletedProcess:
    """The real command line an operator (or Flower) uses."""
    return subprocess.run([sys.executable, "-m", "celery", "-b", stack.redis_url, *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env=stack.env)


def test_a_revoked_queued_job_ends_cancelled_and_never_runs(busy):
    s = busy
    ds = s.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    ft = s.http.post("/finetune", json={"name": "long", "dataset_id": ds.json()["dataset_id"], "steps": 1000})
    assert ft.status_code == 202, ft.text
    ft_id = ft.json()["job_id"]
    wait_until(lambda: (s.http.get(f"/jobs/{ft_id}").json().get("progress") or {}).get("step", 0) >= 2, 60,
               "the fine-tune to be training")
    r = s.http.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2, "seed": 1})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert s.redis.llen("generate") == 1  # its message waits: the only worker is busy

    _celery(s, "control", "revoke", job_id)  # the busy worker replies later (or not at all): no exit status to check
    # the job ends at once, though the only worker is still busy (it listens for revokes on a thread of its own)
    events = sse_events(s.http, f"/jobs/{job_id}/events", timeout=30)
    assert s.http.get(f"/jobs/{ft_id}").json()["state"] == "running"
    assert s.http.post(f"/jobs/{ft_id}/cancel").json()["state"] == "running"  # free the worker
    wait_until(lambda: s.redis.llen("generate") == 0, 30, "the worker to reach the revoked message")
    assert wait_job(s.http, ft_id)["state"] == "cancelled"
    assert [e[0] for e in events] == ["queued", "cancelled"], events
    assert "revoked" in events[-1][2]["reason"]
    job = s.http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["started_at"] is None and job["attempts"] == 0, job
    assert not (s.data_dir / "jobs" / job_id).exists()  # it never ran: no images
    assert s.http.get(f"/images/{job_id}/0.png").status_code == 404
    assert s.redis.zcard(BATCHABLE_KEY + s.redis.hget(f"minidalle:job:{job_id}", "batch_key")) == 0
    assert int(s.redis.hget(STATS_KEY, "generate:cancelled") or 0) == 1
    assert [e[0] for e in sse_events(s.http, f"/jobs/{job_id}/events", timeout=10)] == ["queued", "cancelled"]
    # the worker goes on serving
    r = s.http.post("/generate?wait=60", json={"prompt": "a red circle", "num_inference_steps": 2, "seed": 1})
    assert r.status_code == 200 and r.json()["job"]["state"] == "succeeded", r.text


def _revoked(store, monkeypatch, job_id: str) -> None:
    """What the worker does when Celery discards a revoked message (the `task_revoked` signal)."""
    monkeypatch.setattr(lifecycle, "_store", store)
    lifecycle._on_task_revoked(request=type("Request", (), {"id": job_id})(), terminated=False, expired=False)


def test_the_signal_cancels_a_queued_job_and_leaves_a_running_one(store, monkeypatch):
    queued = "a" * 32
    store.admit("finetune", {"name": "held"}, job_id=queued, owner="k", estimate_s=2.0, bounds=Bounds())
    assert store.reserve_adapter_name("held", queued)
    _revoked(store, monkeypatch, queued)
    job = store.get(queued)
    assert job["state"] == "cancelled" and store.queued("finetune") == (0, 0.0)
    assert [f["type"] for _, f in store.r.xrange(events_key(queued))] == ["queued", "cancelled"]
    assert store.reserve_adapter_name("held", "b" * 32)  # the name is free again

    running = store.create("generate", {"prompt": "p"})
    assert store.claim(running, "w1", stale_after_s=30, max_attempts=3).outcome == "run"
    _revoked(store, monkeypatch, running)  # a duplicate delivery of a running job: dropped, the job runs on
    job = store.get(running)
    assert job["state"] == "running" and not job["cancel_requested"]
    assert [f["type"] for _, f in store.r.xrange(events_key(running))] == ["queued", "started"]

    assert cancel_revoked(store, Volume("unused"), running, terminate=True) == "requested"  # revoke --terminate
    assert store.get(running)["cancel_requested"]  # it stops itself at its next step
    assert revoked_ids({"method": "revoke", "arguments": {"task_id": [running, "../x"], "terminate": True}}) == \
        ([running], True)
    assert revoked_ids({"method": "ping", "arguments": {}}) == ([], False)

    store.finish(running, "succeeded", result={})
    _revoked(store, monkeypatch, running)  # ended: nothing changes
    assert store.get(running)["state"] == "succeeded"
    _revoked(store, monkeypatch, "c" * 32)  # unknown: nothing to do, no error
    assert json.loads(store.r.hget(f"minidalle:job:{running}", "result")) == {}
