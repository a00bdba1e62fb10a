"""Admission through the real API: estimated seconds against the time limit (422), bounded queues and per-key
limits (429 with Retry-After), caps that fit the loaded model."""

from __future__ import annotations

import httpx
import pytest
from _support.fixtures import wait_job
from _support.servers import Stack

from jobs.keys import KeyStore, Limits

SMALL = {"prompt": "a red circle", "num_inference_steps": 2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def queue_only(tmp_path_factory):
    """An API with no worker (nothing leaves the queue), small bounds, an uncalibrated cost model."""
    s = Stack(tmp_path_factory.mktemp("admission"), MINIDALLE_AUTH="keys", MINIDALLE_ADMIN_KEY="md_admission-admin",
              MINIDALLE_MAX_QUEUED_GENERATE="4", MINIDALLE_GENERATE_TIME_LIMIT_S="5", MINIDALLE_DEFAULT_STEP_S="0.5")
    yield s
    s.stop()


def _client(stack, limits: Limits | None = None, name: str = "k") -> httpx.Client:
    token, _ = KeyStore(stack.redis).create(name, limits=limits)
    return httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_over_the_time_limit_is_422_with_the_estimate_and_the_limit(queue_only):
    with _client(queue_only, name="slow") as c:
        r = c.post("/generate", json={**SMALL, "num_inference_steps": 25, "guidance_scale": 7.5})
        assert r.status_code == 422, r.text
        err = r.json()["detail"][0]
        assert err["loc"] == ["body", "num_inference_steps"]
        assert "estimated at 26 s" in err["msg"] and "time limit of 5 s" in err["msg"], err
        r = c.post("/generate", json=SMALL)  # 0.5 s × (2 + 1): fits
        assert r.status_code == 202, r.text
        assert c.get(f"/jobs/{r.json()['job_id']}").json()["estimate_s"] == pytest.approx(1.5)
        c.post(f"/jobs/{r.json()['job_id']}/cancel")


def test_sizes_are_capped_for_the_model(queue_only):
    with _client(queue_only, name="big") as c:
        r = c.post("/generate", json={**SMALL, "width": 1024, "height": 1024})
        assert r.status_code == 422 and "at most 64 for this model" in r.text, r.text


def test_a_full_queue_is_429_with_retry_after_and_frees_up(queue_only):
    with _client(queue_only, name="many") as c:
        ids = []
        for _ in range(4):
            r = c.post("/generate", json=SMALL)
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        r = c.post("/generate", json=SMALL)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
        assert c.post(f"/jobs/{ids[0]}/cancel").json()["state"] == "cancelled"
        r = c.post("/generate", json=SMALL)
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
        for job_id in ids[1:]:
            c.post(f"/jobs/{job_id}/cancel")


def test_per_key_concurrency_and_queued_seconds(queue_only):
    with _client(queue_only, Limits(concurrent_jobs=2), name="two") as two, \
            _client(queue_only, Limits(queued_seconds=2.0), name="short") as short, \
            _client(queue_only, name="bystander") as other:
        ids = [two.post("/generate", json=SMALL).json()["job_id"] for _ in range(2)]
        r = two.post("/generate", json=SMALL)
        assert r.status_code == 429 and "2 jobs queued or running" in r.json()["detail"], r.text
        assert r.headers["retry-after"]
        first = short.post("/generate", json=SMALL)  # 1.5 s
        assert first.status_code == 202
        r = short.post("/generate", json=SMALL)  # 3.0 s > 2 s
        assert r.status_code == 429 and "limit is 2 s" in r.json()["detail"], r.text
        mine = other.post("/generate", json=SMALL)
        assert mine.status_code == 202  # other keys are not affected
        for c, job_id in [(two, i) for i in ids] + [(short, first.json()["job_id"]), (other, mine.json()["job_id"])]:
            assert c.post(f"/jobs/{job_id}/cancel").status_code == 202
        assert two.post("/generate", json=SMALL).status_code == 202  # cancelled jobs gave their places back


def test_the_estimate_is_in_seconds_once_a_worker_measured(stack):
    """The shared stack's worker calibrated at start; the estimate of a job is within a few times its run time."""
    r = stack.http.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 20, "width": 64,
                                           "height": 64, "seed": 3})
    assert r.status_code == 202, r.text
    job = wait_job(stack.http, r.json()["job_id"])
    ran = job["finished_at"] - job["started_at"]
    assert job["state"] == "succeeded" and 0.2 < ran / job["estimate_s"] < 5, (ran, job["estimate_s"])
