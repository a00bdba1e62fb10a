"""The image side through the real stack (redis, uvicorn, Celery workers) on a model that has one: POST /variations
(an uploaded image → its CLIP image embedding → images) and POST /generate with `prior: "diffusion"`; the same
pixels as the library, and refusals that name the field with nothing left on the volume; a fine-tune that trains
the diffusion prior too."""

from __future__ import annotations

import io

import numpy as np
import pytest
from _support.fixtures import _STACKS, png_bytes, shapes_dataset_zip, sse_events
from _support.image_model import build_image_model
from _support.servers import Stack
from PIL import Image

STEPS = {"num_inference_steps": "3", "guidance_scale": "3"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_image_model(tmp_path_factory.mktemp("image-model") / "model")


@pytest.fixture(scope="module")
def istack(tmp_path_factory, model_dir):
    s = Stack(tmp_path_factory.mktemp("variations"), workers={"w1": "generate", "w2": "finetune"},
              MINIDALLE_MODEL=str(model_dir), MINIDALLE_MODEL_ID="image-model")
    _STACKS.append(s)
    yield s
    _STACKS.remove(s)
    s.stop()


def _uploads(s: Stack) -> list:
    folder = s.data_dir / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _pixels(s: Stack, url: str) -> np.ndarray:
    r = s.http.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)


def test_variations_of_an_uploaded_image_are_the_librarys(istack, model_dir):
    from minidalle import MiniDallePipeline

    source = png_bytes((200, 40, 40), size=(40, 32))
    r = istack.http.post("/variations?wait=60", files={"file": ("red.png", source, "image/png")},
                         data={"num_images": "2", "seed": "7", **STEPS})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["state"] == "succeeded" and job["kind"] == "generate" and job["request"]["prompt"] == ""
    images = job["result"]["images"]
    assert [im["seed"] for im in images] == [7, 8]
    pipe = MiniDallePipeline.from_pretrained(model_dir, device="cpu")
    want = pipe("", image=Image.open(io.BytesIO(source)).convert("RGB"), seed=7, num_images_per_prompt=2,
                num_inference_steps=3, guidance_scale=3.0)
    for im, ref in zip(images, want.images, strict=True):
        assert np.abs(_pixels(istack, im["url"]) - np.asarray(ref, dtype=np.int16)).max() <= 1
    # another image, other variations; the same image and seed, the same pixels
    blue = istack.http.post("/variations?wait=60", files={"file": ("b.png", png_bytes((30, 30, 220)), "image/png")},
                            data={"seed": "7", **STEPS}).json()["job"]
    assert np.abs(_pixels(istack, blue["result"]["images"][0]["url"]) - _pixels(istack, images[0]["url"])).max() > 0


def test_generate_with_the_diffusion_prior(istack):
    body = {"prompt": "a red circle", "num_inference_steps": 3, "guidance_scale": 3.0, "seed": 11, "num_images": 2,
            "prior": "diffusion", "prior_num_inference_steps": 4, "prior_guidance_scale": 2.0}
    r = istack.http.post("/generate?wait=60", json=body)
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["state"] == "succeeded" and job["request"]["prior"] == "diffusion"
    mlp = istack.http.post("/generate?wait=60", json={**body, "prior": "mlp"}).json()["job"]
    a, b = (_pixels(istack, j["result"]["images"][0]["url"]) for j in (job, mlp))
    assert np.abs(a - b).max() > 0  # the image tokens change the image
    png = Image.open(io.BytesIO(istack.http.get(job["result"]["images"][0]["url"]).content))
    assert '"prior": "diffusion"' in png.text["minidalle"] and '"prior_steps": 4' in png.text["minidalle"]


def test_a_finetune_trains_the_diffusion_prior_and_reports_its_loss(istack):
    r = istack.http.post("/datasets", files={"file": ("shapes.zip", shapes_dataset_zip(4), "application/zip")})
    assert r.status_code == 201, r.text
    body = {"name": "with-prior", "dataset_id": r.json()["dataset_id"], "steps": 3, "seed": 2, "checkpoint_every": 0}
    r = istack.http.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    events = sse_events(istack.http, f"/jobs/{r.json()['job_id']}/events", timeout=120)
    progress = [e[2] for e in events if e[0] == "progress"]
    assert events[-1][0] == "succeeded" and [p["step"] for p in progress] == [1, 2, 3], events
    assert all(isinstance(p["diffusion_prior_loss"], float) and p["diffusion_prior_loss"] > 0 for p in progress)
    meta = istack.http.get("/adapters/with-prior").json()
    assert meta["priors"] == {"mlp": "adapter", "diffusion": "adapter"} and meta["has_diffusion_prior"] is True
    job = istack.http.post("/generate?wait=60", json={"prompt": "a red circle <lora:with-prior:1>", "seed": 1,
                                                      "num_inference_steps": 3, "prior": "diffusion",
                                                      "prior_num_inference_steps": 3}).json()["job"]
    assert job["state"] == "succeeded" and job["result"]["images"][0]["metadata"]["adapters"] == [["with-prior", 1.0]]


@pytest.mark.parametrize("files, data, field", [
    ({"seed": (None, "1")}, {}, "file"),  # a multipart form without a file
    ({"file": ("x.png", png_bytes(), "image/png"), "other": ("a.txt", b"b", "text/plain")}, {}, "other"),
    ({"file": ("x.png", b"not an image at all", "image/png")}, {}, "file"),
    ({"file": ("x.png", png_bytes(), "image/png")}, {"prior": "diffusion"}, "prior"),
    ({"file": ("x.png", png_bytes(), "image/png")}, {"num_images": "two"}, "num_images"),
    ({"file": ("x.png", png_bytes(), "image/png")}, {"num_inference_steps": "0"}, "num_inference_steps"),
    ({"file": ("x.png", png_bytes(), "image/png")}, {"ip_adapter_scale": "11"}, "ip_adapter_scale"),
])
def test_bad_variations_name_the_field_and_leave_nothing(istack, files, data, field):
    before = _uploads(istack)
    r = istack.http.post("/variations", files=files, data=data)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field, r.text
    assert r.json()["detail"][0]["msg"].startswith(f"{field}: ") and f"{field}: {field}:" not in r.text
    assert _uploads(istack) == before


def test_variations_take_a_form_and_prior_takes_known_names(istack):
    assert istack.http.post("/variations", json={"seed": 1}).status_code == 415
    r = istack.http.post("/generate", json={"prompt": "a", "prior": "clip"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "prior"


def test_a_model_without_an_image_side_refuses_both(tmp_path):
    from minidalle.embedded import TINY_RANDOM

    s = Stack(tmp_path, workers={"w1": "generate"}, MINIDALLE_MODEL=str(TINY_RANDOM))
    try:
        r = s.http.post("/generate", json={"prompt": "a red circle", "prior": "diffusion"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "prior", r.text
        assert "no diffusion prior" in r.text
        r = s.http.post("/variations", files={"file": ("x.png", png_bytes(), "image/png")})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "file", r.text
        assert "can't make variations" in r.text and _uploads(s) == []
    finally:
        s.stop()
