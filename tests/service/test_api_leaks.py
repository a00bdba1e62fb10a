"""Nothing internal leaks: no server paths, host names or model folders in answers, events, PNGs or adapter files."""

from __future__ import annotations

import json
import socket

from _support.fixtures import shapes_dataset_zip, sse_events, wait_job

from minidalle.embedded import default_model


def _internal(stack) -> list[str]:
    return [str(stack.data_dir.resolve()), str(stack.data_dir), default_model(), socket.gethostname()]


def _assert_clean(stack, text: str, what: str) -> None:
    for secret in _internal(stack):
        assert secret not in text, (what, secret, text[:500])


def test_generate_answers_events_and_pngs_name_nothing_internal(stack):
    r = stack.http.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2, "seed": 1})
    job_id = r.json()["job_id"]
    events = sse_events(stack.http, f"/jobs/{job_id}/events")
    job = stack.http.get(f"/jobs/{job_id}")
    _assert_clean(stack, json.dumps(events), "events")
    _assert_clean(stack, job.text, "job")
    png = stack.http.get(job.json()["result"]["images"][0]["url"]).content
    _assert_clean(stack, png.decode("latin-1"), "png")
    assert job.json()["result"]["images"][0]["metadata"]["model"] == "tiny-shapes"  # the model's public name
    _assert_clean(stack, stack.http.get("/jobs").text, "job list")


def test_a_published_adapter_names_nothing_internal(stack):
    ds = stack.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    r = stack.http.post("/finetune", json={"name": "no-leaks", "dataset_id": ds.json()["dataset_id"], "steps": 2})
    job = wait_job(stack.http, r.json()["job_id"], timeout=120)
    assert job["state"] == "succeeded", job
    meta = stack.http.get("/adapters/no-leaks")
    _assert_clean(stack, meta.text, "adapter.json")
    assert "dataset_dir" not in meta.json()["training"] and meta.json()["base_model"] == "tiny-shapes"
    raw = stack.http.get("/adapters/no-leaks/download", params={"file": "adapter.json"}).text
    _assert_clean(stack, raw, "downloaded adapter.json")
    _assert_clean(stack, json.dumps(sse_events(stack.http, f"/jobs/{job['id']}/events")), "fine-tune events")
