"""The A1111 API through the real stack and the real client (`webuiapi`): images, seeds, samplers, `<lora:…>` tags,
infotexts read by a real parser (sd-parsers), the listing routes, progress and interrupt, HTTP Basic and ownership.
And the native API's `<lora:name:weight>` tags."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from _support.adapters import build_adapter
from _support.fixtures import SMALL_CAPS, wait_job
from _support.servers import Stack
from PIL import Image
from sd_parsers import ParserManager

from jobs.keys import KeyStore
from jobs.volume import Volume, write_access
from minidalle.a1111 import addnet_hash
from minidalle.embedded import default_model

ADMIN_KEY = "md_test-admin-key-a1111-0123456789"
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("a1111"), workers={"w1": "generate"}, MINIDALLE_AUTH="keys",
              MINIDALLE_ADMIN_KEY=ADMIN_KEY, **{**SMALL_CAPS, "MINIDALLE_MAX_STEPS": "1000",
                                                "MINIDALLE_BATCH_MAX_IMAGES": "1"})
    keys = KeyStore(s.redis)
    s.tokens = {"alice": keys.create("alice")[0], "bob": keys.create("bob")[0]}
    s.alice = httpx.Client(base_url=s.base_url, timeout=120,
                           headers={"Authorization": f"Bearer {s.tokens['alice']}"})
    alice_id = s.alice.get("/me").json()["id"]
    unet = json.loads((Path(default_model()) / "unet" / "config.json").read_text())
    s.zorb = Volume(s.data_dir).adapter("zorb")
    build_adapter(s.zorb, unet_config=unet, magnitude=0.5)
    write_access(s.zorb, owner=alice_id, visibility="private")
    # the client as its users make it: A1111's --api-auth is HTTP Basic; the password is the key
    s.api = webuiapi.WebUIApi(baseurl=f"{s.base_url}/sdapi/v1", username="alice", password=s.tokens["alice"])
    s.bob = webuiapi.WebUIApi(baseurl=f"{s.base_url}/sdapi/v1", username="bob", password=s.tokens["bob"])
    yield s
    s.alice.close()
    s.stop()


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def _native(sd, **body) -> list[np.ndarray]:
    r = sd.alice.post("/generate?wait=60", json={"prompt": PROMPT, "num_inference_steps": 4, "seed": 5, **body})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["state"] == "succeeded", job
    return [_pixels(Image.open(io.BytesIO(sd.alice.get(img["url"]).content))) for img in job["result"]["images"]]


def test_txt2img_with_the_real_client_makes_the_native_images(sd):
    r = sd.api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, sampler_name="DPM++ 2M", scheduler="Karras",
                       steps=4, cfg_scale=7.5, width=32, height=32, batch_size=2)
    assert len(r.images) == 2 and all(im.size == (32, 32) for im in r.images)
    assert r.info["all_seeds"] == [5, 6] and r.info["seed"] == 5
    assert r.info["sd_model_name"] == "tiny-shapes"
    text = r.info["infotexts"][0]
    assert text.startswith(PROMPT + "\nNegative prompt: blurry\n"), text
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 5, Size: 32x32" in text, text
    assert "Seed: 6" in r.info["infotexts"][1]
    # the same request through the native API (A1111's "DPM++ 2M" + "Karras" is our dpmpp_2m_karras)
    native = _native(sd, negative_prompt="blurry", num_images=2, guidance_scale=7.5, scheduler="dpmpp_2m_karras")
    for got, want in zip(r.images, native, strict=True):
        assert np.array_equal(_pixels(got), want)
    # "Automatic" for DPM++ 2M is Karras, as in A1111; "Uniform" is the plain schedule, which differs
    auto = sd.api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, sampler_name="DPM++ 2M", steps=4,
                          cfg_scale=7.5, width=32, height=32)
    assert np.array_equal(_pixels(auto.images[0]), native[0])
    uniform = sd.api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, sampler_name="DPM++ 2M",
                             scheduler="Uniform", steps=4, cfg_scale=7.5, width=32, height=32)
    assert "Schedule type: Uniform" in uniform.info["infotexts"][0]
    assert np.array_equal(_pixels(uniform.images[0]), _native(sd, negative_prompt="blurry", guidance_scale=7.5,
                                                               scheduler="dpmpp_2m")[0])


def test_random_seed_lora_tag_infotext_png_info_and_a_real_parser(sd):
    r = sd.api.txt2img(prompt=f"{PROMPT} <lora:zorb:0.7>", seed=-1, sampler_name="Euler a", steps=4, width=32,
                       height=32)
    seed = r.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and r.info["all_seeds"] == [seed]
    again = sd.api.txt2img(prompt=PROMPT, seed=-1, sampler_name="Euler a", steps=4, width=32, height=32)
    assert again.info["seed"] != seed  # -1 is random each time
    # the tag applied the adapter: the native request naming it makes the same pixels, and they differ without it
    with_adapter = _native(sd, seed=seed, guidance_scale=7.0, scheduler="euler_ancestral",
                           adapters=[{"name": "zorb", "scale": 0.7}])[0]
    plain = _native(sd, seed=seed, guidance_scale=7.0, scheduler="euler_ancestral")[0]
    assert np.array_equal(_pixels(r.images[0]), with_adapter)
    assert np.abs(with_adapter - plain).max() > 10
    text = r.info["infotexts"][0]
    lora_hash = addnet_hash(sd.zorb / "kohya_lora.safetensors")
    assert re.fullmatch(r"[0-9a-f]{12}", lora_hash)
    assert text.startswith(f"{PROMPT} <lora:zorb:0.7>\nSteps: 4, Sampler: Euler a, "), text
    assert f'Lora hashes: "zorb: {lora_hash}"' in text and "Version: minidalle " in text, text

    info = sd.api.png_info(r.images[0])  # webuiapi sends the PNG as base64
    assert info.info == text
    assert info.parameters["Sampler"] == "Euler a" and info.parameters["Seed"] == str(seed)
    assert info.parameters["Prompt"] == f"{PROMPT} <lora:zorb:0.7>"
    assert info.parameters["Lora hashes"] == f"zorb: {lora_hash}"

    parsed = ParserManager().parse(r.images[0])  # a real reader of A1111 files
    assert parsed is not None and parsed.generator.name == "AUTOMATIC1111"
    sampler = parsed.samplers[0]
    assert sampler.name == "Euler a" and sampler.parameters["seed"] == str(seed)
    assert sampler.parameters["steps"] == "4" and sampler.parameters["scheduler"] == "Automatic"
    assert sampler.model.name == "tiny-shapes" and sampler.model.hash and len(sampler.model.hash) == 10
    assert [p.value for p in sampler.prompts] == [f"{PROMPT} <lora:zorb:0.7>"]
    assert not any(k.startswith("Lora") and k != "Lora hashes" for k in parsed.metadata)  # nothing misfiled


def test_the_routes_clients_read(sd):
    api = sd.api
    assert [m["title"] for m in api.get_sd_models()] == ["tiny-shapes"]
    assert api.util_get_current_model() == "tiny-shapes"
    api.util_set_model("tiny-shapes")  # "switching" to the served model is fine
    r = httpx.post(f"{sd.base_url}/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned.safetensors"},
                   auth=("alice", sd.tokens["alice"]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"], r.text
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "karras", "uniform"}
    assert [lo["name"] for lo in api.get_loras()] == ["zorb"]
    assert "/adapters/zorb/download" in api.get_loras()[0]["path"]
    assert sd.bob.get_loras() == []  # another key's adapter is not listed
    assert httpx.post(f"{sd.base_url}/sdapi/v1/refresh-loras", auth=("alice", sd.tokens["alice"])).status_code == 200
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_upscalers()[0]["name"] == "None"


def _post(sd, body: dict, auth=None) -> httpx.Response:
    auth = auth or ("alice", sd.tokens["alice"])
    return httpx.post(f"{sd.base_url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 32,
                                                                 "height": 32, **body}, auth=auth, timeout=60)


def _field(r: httpx.Response) -> str:
    assert r.status_code == 422, r.text
    return ".".join(str(p) for p in r.json()["detail"][0]["loc"][1:]) + " | " + r.json()["detail"][0]["msg"]


def test_refusals_name_the_a1111_field(sd):
    assert _field(_post(sd, {"enable_hr": True})).startswith("enable_hr | ")
    assert _field(_post(sd, {"alwayson_scripts": {"controlnet": {"args": []}}})).startswith("alwayson_scripts")
    assert _field(_post(sd, {"sampler_name": "DPM++ SDE"})).startswith("sampler_name | ")
    assert _field(_post(sd, {"sampler_name": "Euler a", "scheduler": "Exponential"})).startswith("scheduler | ")
    assert _field(_post(sd, {"steps": 5000})).startswith("steps | Input should be less than or equal to 1000")
    assert _field(_post(sd, {"cfg_scale": -1})).startswith("cfg_scale")
    assert _field(_post(sd, {"width": 512})).startswith("width | width: at most 256")  # A1111's default size
    assert _field(_post(sd, {"prompt": "a circle <lora:zorb:1:2>"})).startswith("prompt | ")
    r = _post(sd, {"prompt": "a circle <lora:nope:1>"})
    assert r.status_code == 404 and "prompt: adapter 'nope' not found" in r.text
    r = _post(sd, {"prompt": "a circle <lora:zorb>"}, auth=("bob", sd.tokens["bob"]))
    assert r.status_code == 404  # another key's adapter
    assert _post(sd, {}, auth=("alice", "not-a-key")).status_code == 401
    assert httpx.get(f"{sd.base_url}/sdapi/v1/sd-models").status_code == 401
    # the ~35 fields clients send with their defaults are accepted (webuiapi sent them all above); so is an
    # unknown one
    r = _post(sd, {"eta": 1.0, "s_churn": 0, "do_not_save_grid": False, "some_extension_field": 3, "seed": 11})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [11]


def test_progress_and_interrupt(sd):
    out: dict = {}

    def long_job():
        out["r"] = _post(sd, {"steps": 900, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"})

    t = threading.Thread(target=long_job)
    t.start()
    try:
        progress = None
        for _ in range(600):
            progress = sd.api.get_progress()
            if progress["state"]["sampling_step"] > 0:
                break
            t.join(0.05)
        assert progress["state"]["sampling_steps"] == 900 and 0 < progress["progress"] < 1, progress
        assert progress["state"]["job_count"] == 1
        assert sd.bob.get_progress()["state"]["job_count"] == 0  # another key sees nothing of it
        sd.bob.interrupt()  # and can't stop it
        assert sd.api.get_progress()["state"]["interrupted"] is False
        sd.api.interrupt()
    finally:
        t.join(120)
    r = out["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert r.json()["images"] == [] and info["state"] == "cancelled"
    assert wait_job(sd.alice, info["job_id"])["state"] == "cancelled"


def test_native_api_applies_lora_tags(sd):
    tagged = sd.alice.post("/generate?wait=60", json={"prompt": f"<lora:zorb:0.7> {PROMPT}", "seed": 9,
                                                      "num_inference_steps": 4})
    assert tagged.status_code == 200, tagged.text
    job = tagged.json()["job"]
    meta = job["result"]["images"][0]["metadata"]
    assert meta["adapters"] == [["zorb", 0.7]] and meta["prompt"] == PROMPT
    got = _pixels(Image.open(io.BytesIO(sd.alice.get(job["result"]["images"][0]["url"]).content)))
    assert np.array_equal(got, _native(sd, seed=9, adapters=[{"name": "zorb", "scale": 0.7}])[0])

    def refused(body):
        r = sd.alice.post("/generate", json={"num_inference_steps": 2, **body})
        return r.status_code, r.json()["detail"][0]["loc"] if r.status_code == 422 else r.json()["detail"]

    assert refused({"prompt": "a circle", "negative_prompt": "<lora:zorb:1>"}) == (422, ["body", "negative_prompt"])
    assert refused({"prompt": "a circle <lora:zorb:x>"}) == (422, ["body", "prompt"])
    assert refused({"prompt": "<lora:zorb:0.5>"}) == (422, ["body", "prompt"])  # nothing left to draw
    assert refused({"prompt": "a circle <lora:zorb>", "adapters": [{"name": "zorb", "scale": 1}]}) == \
        (422, ["body", "prompt"])
    assert refused({"prompt": "a circle <lora:ghost:1>"}) == (404, "prompt: adapter 'ghost' not found")


def test_png_info_refuses_what_is_not_an_image(sd):
    def png_info(image: str) -> httpx.Response:
        return sd.alice.post("/sdapi/v1/png-info", json={"image": image})

    assert png_info("%%%").status_code == 422
    r = png_info(base64.b64encode(b"not an image at all").decode())
    assert r.status_code == 422 and "image" in r.text
    plain = io.BytesIO()
    Image.new("RGB", (4, 4)).save(plain, format="PNG")
    r = png_info("data:image/png;base64," + base64.b64encode(plain.getvalue()).decode())
    assert r.status_code == 200 and r.json() == {"info": "", "items": {}, "parameters": {}}
