"""Fine-tune through the real stack: dataset upload → training job → adapter published → generate with it."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from _support.fixtures import shapes_dataset_zip, sse_events, wait_job
from PIL import Image


def _upload(stack, n: int = 4) -> str:
    r = stack.http.post("/datasets", files={"file": ("shapes.zip", shapes_dataset_zip(n), "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["images"] == n and r.json()["warnings"] == []
    assert stack.http.get(f"/datasets/{r.json()['dataset_id']}").json()["images"] == n
    return r.json()["dataset_id"]


def _pixels(stack, **body) -> np.ndarray:
    r = stack.http.post("/generate?wait=30", json={"prompt": "a red square", "num_inference_steps": 4, "seed": 5,
                                                   **body})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["state"] == "succeeded", job
    png = stack.http.get(job["result"]["images"][0]["url"])
    return np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"), dtype=np.int16)


def test_finetune_publishes_adapter_that_changes_generation(stack):
    dataset_id = _upload(stack)
    body = {"name": "shapes-a", "dataset_id": dataset_id, "steps": 20, "learning_rate": 1e-2,
            "checkpoint_every": 10, "validation_prompts": ["a red square"], "seed": 1}
    r = stack.http.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    dup = stack.http.post("/finetune", json=body)  # the name is held while the first job runs
    assert dup.status_code == 409, dup.text
    assert "shapes-a" in dup.json()["detail"] and dup.json()["detail"].startswith("name:")

    events = sse_events(stack.http, f"/jobs/{job_id}/events", timeout=120)
    kinds = [e[0] for e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "succeeded", kinds
    steps = [e[2]["step"] for e in events if e[0] == "progress"]
    assert steps == list(range(1, 21))
    assert all(isinstance(e[2]["loss"], float) for e in events if e[0] == "progress")
    assert [e[2]["step"] for e in events if e[0] == "checkpoint"] == [10]
    validation = [e[2] for e in events if e[0] == "validation"]
    assert validation and validation[0]["images"]
    v = stack.http.get(validation[0]["images"][0])
    assert v.status_code == 200 and v.headers["content-type"] == "image/png"

    job = stack.http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded"
    assert job["result"]["adapter"]["name"] == "shapes-a"
    assert job["progress"]["step"] == 20 and job["progress"]["total"] == 20
    job_dir = stack.data_dir / "jobs" / job_id
    assert not (job_dir / "checkpoints").exists()  # published: the checkpoints are dropped (a cancel keeps them)
    assert (job_dir / "validation").is_dir()  # served until the job expires

    listed = stack.http.get("/adapters").json()["adapters"]
    assert "shapes-a" in [a["name"] for a in listed]
    meta = stack.http.get("/adapters/shapes-a").json()
    assert meta["steps"] == 20 and meta["training"]["learning_rate"] == 1e-2
    zipped = stack.http.get("/adapters/shapes-a/download")
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
        assert sorted(zf.namelist()) == ["shapes-a/adapter.json", "shapes-a/adapter.safetensors",
                                         "shapes-a/pytorch_lora_weights.safetensors"]
    assert stack.http.get("/adapters/shapes-a/download?file=").content == zipped.content  # empty: the zip
    one = stack.http.get("/adapters/shapes-a/download", params={"file": "pytorch_lora_weights.safetensors"})
    assert one.status_code == 200 and len(one.content) > 100

    taken = stack.http.post("/finetune", json=body)
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]

    base = _pixels(stack)
    tuned = _pixels(stack, adapters=[{"name": "shapes-a", "scale": 1.0}])
    assert np.abs(base - tuned).mean() > 0.5, "the adapter did not change the image"
    assert np.array_equal(_pixels(stack), base)  # the adapter is switched off again for a plain request

    assert stack.http.delete("/adapters/shapes-a").status_code == 204
    assert "shapes-a" not in [a["name"] for a in stack.http.get("/adapters").json()["adapters"]]
    r = stack.http.post("/generate", json={"prompt": "x", "adapters": [{"name": "shapes-a"}]})
    assert r.status_code == 404


def test_finetune_multipart_with_the_zip(stack):
    files = {"file": ("shapes.zip", shapes_dataset_zip(2), "application/zip")}
    data = {"name": "shapes-mp", "steps": "3", "checkpoint_every": "2", "validation_prompts": ["a red square"],
            "train_prior": "false", "resolution": ""}
    r = stack.http.post("/finetune", data=data, files=files)
    assert r.status_code == 202, r.text
    job = wait_job(stack.http, r.json()["job_id"], timeout=120)
    assert job["state"] == "succeeded", job
    assert job["request"]["train_prior"] is False and job["request"]["dataset_id"]
    assert stack.http.get("/adapters/shapes-mp").json()["steps"] == 3


def test_cancel_running_finetune_keeps_checkpoint_publishes_nothing(stack):
    dataset_id = _upload(stack, 2)
    r = stack.http.post("/finetune", json={"name": "shapes-cancelled", "dataset_id": dataset_id, "steps": 1000,
                                           "checkpoint_every": 2})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    answers = []

    def cancel_after_a_checkpoint(event):
        if event[0] == "checkpoint" and not answers:
            answers.append(stack.http.post(f"/jobs/{job_id}/cancel"))

    events = sse_events(stack.http, f"/jobs/{job_id}/events", timeout=120, on_event=cancel_after_a_checkpoint)
    assert answers and answers[0].status_code == 202, answers
    assert answers[0].json()["state"] == "running"
    kinds = [e[0] for e in events]
    assert "cancel_requested" in kinds and kinds[-1] == "cancelled", kinds
    # the step it stopped at: its progress event, or its checkpoint event when the cancel was seen right there
    last_step = max(e[2]["step"] for e in events if e[0] in ("progress", "checkpoint"))
    assert last_step < 1000
    job = stack.http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["result"] is None
    checkpoints = sorted(p.name for p in (stack.data_dir / "jobs" / job_id / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1] == f"step-{last_step:06d}"  # saved at the step it stopped
    assert stack.http.get("/adapters/shapes-cancelled").status_code == 404
    assert not (stack.data_dir / "adapters" / "shapes-cancelled").exists()
    # the name is free again
    again = stack.http.post("/finetune", json={"name": "shapes-cancelled", "dataset_id": dataset_id, "steps": 1})
    assert again.status_code == 202, again.text
    assert wait_job(stack.http, again.json()["job_id"], timeout=120)["state"] == "succeeded"
