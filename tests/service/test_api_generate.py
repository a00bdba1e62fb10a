"""Generate through the real stack: HTTP → Redis → Celery worker → PNG on the volume → HTTP."""

from __future__ import annotations

import io
import json
import re
import threading

import numpy as np
from _support.fixtures import sse_events, wait_job
from PIL import Image


def _generate(stack, **body):
    body = {"prompt": "a red circle on a blue background", "num_inference_steps": 4, "seed": 7, **body}
    r = stack.http.post("/generate", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def _image(stack, url: str) -> Image.Image:
    r = stack.http.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    im.load()
    return im


def test_generate_png_fetched_and_decoded(stack):
    accepted = _generate(stack, num_images=2, negative_prompt="blurry")
    assert accepted["status_url"] == f"/jobs/{accepted['job_id']}"
    job = wait_job(stack.http, accepted["job_id"])
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1
    images = job["result"]["images"]
    assert [i["index"] for i in images] == [0, 1]
    assert [i["seed"] for i in images] == [7, 8]  # image i uses seed + i
    im = _image(stack, images[0]["url"])
    assert im.size == (32, 32)  # the embedded model's native size
    params = im.text["parameters"]
    assert params.startswith("a red circle on a blue background\nNegative prompt: blurry\n")
    assert "Seed: 7" in params and "Steps: 4" in params
    assert np.asarray(im).std() > 0  # not a blank image
    assert job["progress"] == {"step": 4, "total": 4, "eta_s": 0.0, "loss": None}


def test_same_seed_same_pixels_and_wait_returns_the_finished_job(stack):
    r1 = stack.http.post("/generate?wait=30", json={"prompt": "a green square", "num_inference_steps": 3, "seed": 3})
    r2 = stack.http.post("/generate?wait=30", json={"prompt": "a green square", "num_inference_steps": 3, "seed": 3})
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    j1, j2 = r1.json()["job"], r2.json()["job"]
    assert j1["state"] == j2["state"] == "succeeded"
    a = np.asarray(_image(stack, j1["result"]["images"][0]["url"]))
    b = np.asarray(_image(stack, j2["result"]["images"][0]["url"]))
    assert np.array_equal(a, b)


def test_seed_is_chosen_and_reported_when_omitted(stack):
    r = stack.http.post("/generate?wait=30", json={"prompt": "a cat", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert isinstance(job["request"]["seed"], int)
    assert job["result"]["images"][0]["seed"] == job["request"]["seed"]


def test_sse_progress_in_order_and_ends_with_final_event_also_for_late_listener(stack):
    steps = 6
    accepted = _generate(stack, num_inference_steps=steps)
    live: list = []
    t = threading.Thread(target=lambda: live.extend(sse_events(stack.http, accepted["events_url"])))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    late = sse_events(stack.http, accepted["events_url"])  # after the job ended: a full replay
    for events in (live, late):
        kinds = [e[0] for e in events]
        assert kinds[0] == "queued" and kinds[1] == "started", kinds
        assert kinds[-1] == "succeeded", kinds
        progress = [e[2]["step"] for e in events if e[0] == "progress"]
        assert progress == list(range(1, steps + 1))
        assert all(e[2]["total"] == steps for e in events if e[0] == "progress")
        assert kinds.index("image") > kinds.index("progress")
        assert events[-1][2]["result"]["images"][0]["url"].endswith("/0.png")
        ids = [e[1] for e in events]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert [e[1] for e in live] == [e[1] for e in late]
    # resuming with Last-Event-ID gives only what came after it
    resumed = sse_events(stack.http, accepted["events_url"], headers={"Last-Event-ID": late[2][1]})
    assert [e[1] for e in resumed] == [e[1] for e in late[3:]]


def test_jobs_listing_and_filters(stack):
    accepted = _generate(stack, num_inference_steps=1)
    wait_job(stack.http, accepted["job_id"])
    jobs = stack.http.get("/jobs", params={"kind": "generate", "state": "succeeded", "limit": 2}).json()["jobs"]
    assert 1 <= len(jobs) <= 2
    assert all(j["kind"] == "generate" and j["state"] == "succeeded" for j in jobs)
    assert jobs[0]["id"] == accepted["job_id"]  # newest first
    assert all(j["kind"] == "finetune" for j in stack.http.get("/jobs", params={"kind": "finetune"}).json()["jobs"])
    bad = stack.http.get("/jobs", params={"state": "sleeping"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "state"]


def test_health_ready_metrics(stack):
    assert stack.http.get("/healthz").json() == {"status": "ok"}
    ready = stack.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["workers_ready"] == {"generate": 1, "finetune": 1}
    _generate(stack, num_inference_steps=2)
    wait_job(stack.http, stack.http.get("/jobs", params={"limit": 1}).json()["jobs"][0]["id"])
    text = stack.http.get("/metrics").text
    assert 'minidalle_http_requests_total{method="POST",route="/generate",status="202"}' in text
    assert 'minidalle_jobs{kind="generate",state="succeeded"}' in text
    assert 'minidalle_queue_depth{queue="generate"} 0.0' in text
    count = [line for line in text.splitlines() if line.startswith('minidalle_step_seconds_count{kind="generate"}')]
    assert count and float(count[0].split()[-1]) >= 2


def test_docs_are_self_hosted(stack):
    page = stack.http.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assert "/static-offline-docs/swagger-ui-bundle.js" in page.text
    js = stack.http.get("/static-offline-docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    spec = stack.http.get("/openapi.json").json()
    assert spec["components"]["schemas"]["GenerateRequest"]["examples"][0]["prompt"]
    assert "multipart/form-data" in spec["paths"]["/finetune"]["post"]["requestBody"]["content"]
    # every $ref in the spec resolves (a dangling one breaks Swagger's rendering of that body)
    refs = set(re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs and refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])
    finetune_json = spec["paths"]["/finetune"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "dataset_id" in finetune_json["properties"] and finetune_json["examples"][0]["name"]
