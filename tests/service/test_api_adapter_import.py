"""POST /adapters through the real stack (keys mode): a kohya or diffusers LoRA made elsewhere is checked and converted
on a worker and then serves like a trained adapter (the library's pixels exactly); what can't be used is refused by
name (pickles unread, LyCORIS, text encoder, other shapes, bad names, taken names, oversized files), leaving nothing
on the data volume; another key can't see the import."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _support import fixtures
from _support.adapters import build_adapter
from _support.fixtures import SMALL_CAPS, wait_job
from _support.servers import Stack
from PIL import Image
from safetensors.torch import load_file, save_file

from jobs.keys import KeyStore
from minidalle.adapters import DIFFUSERS_FILE
from minidalle.embedded import default_model
from minidalle.lora_formats import KOHYA_FILE

ADMIN_KEY = "md_test-admin-key-0123456789"
REQUEST = {"prompt": "a red circle on a blue background", "num_inference_steps": 4, "seed": 5, "guidance_scale": 7.5}
UNET = json.loads((Path(default_model()) / "unet" / "config.json").read_text())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("import"), workers={"w1": "generate"}, MINIDALLE_AUTH="keys",
              MINIDALLE_ADMIN_KEY=ADMIN_KEY, **SMALL_CAPS)
    keys = KeyStore(s.redis)
    s.alice = httpx.Client(base_url=s.base_url, timeout=120,
                           headers={"Authorization": f"Bearer {keys.create('alice')[0]}"})
    s.bob = httpx.Client(base_url=s.base_url, timeout=120,
                         headers={"Authorization": f"Bearer {keys.create('bob')[0]}"})
    s.loras = s.root / "loras"
    fixtures._STACKS.append(s)  # its logs are shown when a test fails
    yield s
    fixtures._STACKS.remove(s)
    s.alice.close()
    s.bob.close()
    s.stop()


def _lora(stack, name: str, *, seed: int = 0, unet=None) -> Path:
    """An adapter folder made by the library (no prior: what another tool's LoRA carries); it holds the LoRA as a
    kohya file and as a diffusers file too."""
    return build_adapter(stack.loras / name, unet_config=unet or UNET, seed=seed, magnitude=0.5)


def _upload(client: httpx.Client, name: str, data: bytes, filename: str = "lora.safetensors", **params):
    return client.post("/adapters", params=params, data={"name": name},
                       files={"file": (filename, data, "application/octet-stream")})


def _pixels(client: httpx.Client, **body) -> np.ndarray:
    r = client.post("/generate?wait=60", json={**REQUEST, **body})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["state"] == "succeeded", job
    return np.asarray(Image.open(io.BytesIO(client.get(job["result"]["images"][0]["url"]).content)).convert("RGB"))


@pytest.fixture(scope="module")
def library():
    """What the library makes with a LoRA loaded straight from its folder."""
    from minidalle import MiniDallePipeline

    pipe = MiniDallePipeline.from_pretrained(default_model(), device="cpu")

    def make(folder: Path) -> np.ndarray:
        name = pipe.load_adapter(folder, name=folder.name)
        request = {k: v for k, v in REQUEST.items() if k != "prompt"}
        image = pipe(REQUEST["prompt"], adapters=[(name, 1.0)], **request).images[0]
        return np.asarray(image.convert("RGB"))

    return make


def _nothing_left(stack, name: str) -> None:
    assert not (stack.data_dir / "adapters" / name).exists()
    uploads = stack.data_dir / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())


def test_kohya_and_diffusers_files_import_and_make_the_librarys_pixels(stack, library):
    a = _lora(stack, "a")
    r = _upload(stack.alice, "kohya-a", (a / KOHYA_FILE).read_bytes(), filename="my_style.safetensors")
    assert r.status_code == 201, r.text
    summary = r.json()
    assert summary["name"] == "kohya-a" and summary["url"] == "/adapters/kohya-a" and summary["mine"] is True
    assert summary["download_url"] == "/adapters/kohya-a/download" and summary["visibility"] == "private"
    assert summary["base_model"] == "tiny-shapes" and summary["steps"] is None  # no folder names, no training
    listed = {x["name"]: x for x in stack.alice.get("/adapters").json()["adapters"]}
    assert listed["kohya-a"] == summary
    meta = stack.alice.get("/adapters/kohya-a").json()
    assert meta["imported_from"] == "kohya" and meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0
    _nothing_left(stack, "never-made")  # the upload went with its job
    jobs = stack.alice.get("/jobs", params={"kind": "import"}).json()["jobs"]
    assert jobs[0]["state"] == "succeeded" and jobs[0]["result"]["adapter"]["name"] == "kohya-a"

    r = _upload(stack.alice, "diffusers-a", (a / DIFFUSERS_FILE).read_bytes(), filename=DIFFUSERS_FILE)
    assert r.status_code == 201, r.text
    assert stack.alice.get("/adapters/diffusers-a").json()["imported_from"] == "diffusers"

    want = library(a)
    base = _pixels(stack.alice)
    assert np.abs(base.astype(int) - want).mean() > 0.5, "the LoRA does not change the image: a useless test"
    for name in ("kohya-a", "diffusers-a"):
        assert np.array_equal(_pixels(stack.alice, adapters=[{"name": name, "scale": 1}]), want), name
    one = stack.alice.get("/adapters/kohya-a/download", params={"file": "pytorch_lora_weights.safetensors"})
    assert one.status_code == 200 and one.content

    # deleted and imported again under the same name, another LoRA: the worker's cache does not serve the old one
    assert stack.alice.delete("/adapters/kohya-a").status_code == 204
    b = _lora(stack, "b", seed=1)
    assert _upload(stack.alice, "kohya-a", (b / KOHYA_FILE).read_bytes()).status_code == 201
    assert np.array_equal(_pixels(stack.alice, adapters=[{"name": "kohya-a", "scale": 1}]), library(b))

    # another key: as if it did not exist
    assert stack.bob.get("/adapters/kohya-a").status_code == 404
    assert "kohya-a" not in [x["name"] for x in stack.bob.get("/adapters").json()["adapters"]]
    r = stack.bob.post("/generate", json={**REQUEST, "adapters": [{"name": "kohya-a"}]})
    assert r.status_code == 404, r.text
    assert stack.bob.get(f"/jobs/{jobs[0]['id']}").status_code == 404


class _Trap:
    """Unpickling this creates the marker file: proof that somebody unpickled the upload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _detail(r: httpx.Response) -> str:
    body = r.json()["detail"]
    return body if isinstance(body, str) else " | ".join(e["msg"] for e in body)


def _refused(stack, r: httpx.Response, status: int, field: str, *words: str) -> None:
    assert r.status_code == status, r.text
    detail = _detail(r)
    assert detail.startswith(f"{field}: "), detail
    if status == 422:
        assert r.json()["detail"][0]["loc"] == ["body", field], r.json()
    for w in words:
        assert w in detail, detail


def test_pickles_are_refused_unread(stack, tmp_path):
    marker = tmp_path / "unpickled"
    trap = pickle.dumps({"lora_unet_x.lora_down.weight": _Trap(marker)})
    buf = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": _Trap(marker)}, buf)
    for data, filename in ((trap, "lora.ckpt"), (trap, "disguised.safetensors"), (buf.getvalue(), "lora.pt")):
        r = _upload(stack.alice, "pickled", data, filename=filename)
        _refused(stack, r, 422, "file", filename, "not a safetensors file", "pickle", "nothing uploaded is ever "
                 "unpickled")
        _nothing_left(stack, "pickled")
    pickle.loads(trap)  # the trap works: unpickling it makes the marker (here, in the test, on purpose)
    assert marker.exists()
    marker.unlink()
    r = _upload(stack.alice, "pickled", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _refused(stack, r, 422, "file", "header is not JSON")
    assert not marker.exists()


def _kohya_with(stack, extra: dict) -> bytes:
    d = dict(load_file(_lora(stack, "donor") / KOHYA_FILE))
    d.update(extra)
    buf = stack.loras / "changed.safetensors"
    save_file(d, buf)
    return buf.read_bytes()


@pytest.mark.parametrize("extra, words", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.zeros(2, 2)}, ["LyCORIS", "lokr_w1"]),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 8)}, ["LyCORIS", "hada_w1_a"]),
    ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
     ["text-encoder", "lora_te_text_model_encoder_layers_0_mlp_fc1"]),
])
def test_loras_the_service_cant_use_are_refused_by_key(stack, extra, words):
    r = _upload(stack.alice, "odd", _kohya_with(stack, extra))
    _refused(stack, r, 422, "file", *words)
    _nothing_left(stack, "odd")


def test_a_lora_for_another_model_is_refused(stack):
    other = {**UNET, "cross_attention_dim": UNET["cross_attention_dim"] * 2}
    r = _upload(stack.alice, "alien", (_lora(stack, "alien", unet=other) / DIFFUSERS_FILE).read_bytes())
    _refused(stack, r, 422, "file", "does not fit this model")
    _nothing_left(stack, "alien")


def test_names_sizes_and_forms_are_checked_before_anything_is_queued(stack):
    good = (_lora(stack, "c") / KOHYA_FILE).read_bytes()
    before = stack.alice.get("/jobs", params={"kind": "import"}).json()["jobs"]
    _refused(stack, _upload(stack.alice, "-bad name", good), 422, "name", "must be 1-64 characters")
    assert _upload(stack.alice, "taken", good).status_code == 201
    _refused(stack, _upload(stack.alice, "taken", good), 409, "name", "already exists")
    _refused(stack, _upload(stack.bob, "taken", good), 409, "name", "already exists")  # one namespace
    big = int(SMALL_CAPS["MINIDALLE_MAX_UPLOAD_BYTES"]) + 1
    _refused(stack, _upload(stack.alice, "big", good + b"\0" * big), 413, "file")
    _nothing_left(stack, "big")
    r = stack.alice.post("/adapters", data={"name": "x"})
    assert r.status_code in (415, 422), r.text
    r = stack.alice.post("/adapters", data={"name": "x", "visibility": "public"}, files={"file": ("a", good)})
    _refused(stack, r, 422, "visibility", "unexpected form field")
    after = stack.alice.get("/jobs", params={"kind": "import"}).json()["jobs"]
    assert len(after) == len(before) + 1  # only the import of "taken" became a job
    _nothing_left(stack, "x")


def test_an_import_that_does_not_end_in_time_answers_202(stack):
    good = (_lora(stack, "d") / KOHYA_FILE).read_bytes()
    r = _upload(stack.alice, "later", good, wait=0)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status_url"] == f"/jobs/{job['job_id']}"
    assert wait_job(stack.alice, job["job_id"])["state"] == "succeeded"
    assert stack.alice.get("/adapters/later").status_code == 200


def test_openapi_documents_the_upload(stack):
    op = stack.alice.get("/openapi.json").json()["paths"]["/adapters"]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["file"]["format"] == "binary" and schema["required"] == ["file", "name"]
    assert {"201", "202", "409", "413", "422", "429"} <= set(op["responses"])
