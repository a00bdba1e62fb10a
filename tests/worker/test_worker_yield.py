"""A fine-tune yields to image requests on a worker that serves both queues: it checkpoints, goes back to its queue
(no attempt counted), the image is made, the fine-tune resumes, and its adapter is bit for bit what an uninterrupted
run makes."""

from __future__ import annotations

import time

import pytest
import torch
from _support.fixtures import shapes_dataset_zip, sse_events
from _support.servers import Stack, wait_until
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def both_queues(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("yield"), workers={"w1": "generate,finetune"},
              MINIDALLE_YIELD_AFTER_S="0.2", MINIDALLE_YIELD_MIN_INTERVAL_S="0.5")
    yield s
    s.stop()


def test_a_finetune_yields_to_an_image_and_resumes_exactly(both_queues):
    s = both_queues
    ds = s.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(4), "application/zip")})
    dataset_id = ds.json()["dataset_id"]
    body = {"name": "yielder", "dataset_id": dataset_id, "steps": 150, "seed": 3, "train_prior": True}
    ft = s.http.post("/finetune", json=body).json()["job_id"]
    wait_until(lambda: (s.http.get(f"/jobs/{ft}").json().get("progress") or {}).get("step", 0) >= 5, 60,
               "the fine-tune to be training")

    t0 = time.monotonic()
    r = s.http.post("/generate?wait=60", json={"prompt": "a red circle", "num_inference_steps": 4, "seed": 1})
    waited = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["job"]["state"] == "succeeded", r.text
    during = s.http.get(f"/jobs/{ft}").json()
    assert during["state"] in ("queued", "running"), during  # the image did not wait for the whole fine-tune

    events = sse_events(s.http, f"/jobs/{ft}/events", timeout=120)
    assert events[-1][0] == "succeeded", events[-5:]
    requeued = [e for e in events if e[0] == "requeued"]
    assert requeued and "yielding" in requeued[0][2]["reason"], [e[0] for e in events]
    steps = [e[2]["step"] for e in events if e[0] == "progress"]
    assert steps[-1] == 150 and steps == sorted(steps)
    job = s.http.get(f"/jobs/{ft}").json()
    assert job["attempts"] == 1  # a yield is not a failed attempt

    # the same fine-tune, uninterrupted, in this process: the same weights, bit for bit
    from minidalle.training import TrainConfig, train

    work = s.root / "straight"
    config = TrainConfig(dataset_dir=str(s.data_dir / "datasets" / dataset_id), output_dir=str(work / "adapter"),
                         work_dir=str(work), steps=150, seed=3, checkpoint_every=0, resume=False)
    train(config)
    ours = load_file(work / "adapter" / "adapter.safetensors")
    served = load_file(s.data_dir / "adapters" / "yielder" / "adapter.safetensors")
    assert ours.keys() == served.keys()
    differ = [k for k in ours if not torch.equal(ours[k], served[k])]
    assert not differ, differ[:3]
    print(f"image waited {waited:.2f} s while a 150-step fine-tune ran")
