"""Every bad-input case over real HTTP: the status, and a message that names the field; nothing stored is lost."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
from _support.fixtures import make_zip, png_bytes, shapes_dataset_zip

GOOD = {"prompt": "a red circle", "num_inference_steps": 2}


def _errors(r) -> list[dict]:
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def _assert_422(r, field: str, *words: str) -> str:
    errors = _errors(r)
    hit = [e for e in errors if field in [str(p) for p in e["loc"]]]
    assert hit, f"no error names {field!r}: {errors}"
    msg = hit[0]["msg"]
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.mark.parametrize("field,value,words", [
    ("num_inference_steps", 0, ["greater than or equal to 1"]),
    ("num_inference_steps", 51, ["num_inference_steps: at most 50"]),
    ("guidance_scale", 51, ["less than or equal to 50"]),
    ("guidance_scale", -1, ["greater than or equal to 0"]),
    ("num_images", 0, ["greater than or equal to 1"]),
    ("num_images", 5, ["num_images: at most 4"]),
    ("seed", -1, ["greater than or equal to 0"]),
    ("width", 100, ["multiple of 8"]),
    ("height", 36, ["multiple of 8"]),
    ("width", 264, ["width: at most 256"]),
    ("height", 512, ["height: at most 256"]),
    ("scheduler", "nope", ["unknown scheduler 'nope'", "dpmpp_2m"]),
    ("prompt", "", ["at least 1 character"]),
    ("prompt", "   ", ["must not be blank"]),
    ("seed", True, ["valid integer"]),
    ("num_inference_steps", 3, ["pndm scheduler of this model needs at least 4"]),
    ("unknown_field", 1, ["Extra inputs are not permitted"]),
])
def test_generate_field_out_of_range(stack, field, value, words):
    body = {**GOOD, field: value}
    if "pndm" in words[0]:
        body["scheduler"] = "pndm"
    _assert_422(stack.http.post("/generate", json=body), field, *words)


@pytest.mark.parametrize("raw,field", [
    (b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
    (b'{"prompt": "x", "adapters": [{"name": "a", "scale": Infinity}]}', "scale"),
])
def test_non_finite_numbers_are_a_422_not_a_500(stack, raw, field):
    """Python's JSON parser accepts NaN/Infinity; the answer must still render (JSON has no such numbers)."""
    r = stack.http.post("/generate", content=raw, headers={"content-type": "application/json"})
    _assert_422(r, field, "finite number")
    assert "NaN" in r.text or "Infinity" in r.text or "nan" in r.text or "inf" in r.text


def test_generate_same_adapter_twice(stack):
    body = {**GOOD, "adapters": [{"name": "a1", "scale": 1}, {"name": "a1", "scale": 0.5}]}
    _assert_422(stack.http.post("/generate", json=body), "adapters", "listed twice")


def test_generate_prompt_over_token_limit_says_how_many(stack):
    prompt = " ".join(["zebra"] * 60)  # unknown words tokenize byte by byte in the tiny tokenizer: way over 75
    msg = _assert_422(stack.http.post("/generate", json={**GOOD, "prompt": prompt}), "prompt", "tokens",
                      "at most 75")
    n = int(msg.split("prompt: ")[1].split(" tokens")[0])
    assert n > 75
    _assert_422(stack.http.post("/generate", json={**GOOD, "negative_prompt": prompt}), "negative_prompt",
                "at most 75")


def test_generate_invalid_and_unknown_adapter(stack):
    _assert_422(stack.http.post("/generate", json={**GOOD, "adapters": [{"name": "../etc", "scale": 1}]}),
                "name", "pattern")
    _assert_422(stack.http.post("/generate", json={**GOOD, "adapters": [{"name": "ok", "scale": 11}]}),
                "scale", "less than or equal to 10")
    r = stack.http.post("/generate", json={**GOOD, "adapters": [{"name": "no-such-adapter"}]})
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == "adapters.0.name: adapter 'no-such-adapter' not found"


def test_generate_wait_above_cap(stack):
    _assert_422(stack.http.post("/generate?wait=61", json=GOOD), "wait", "at most 60")


def test_malformed_json(stack):
    r = stack.http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = stack.http.post("/finetune", content=b"{not json", headers={"content-type": "application/json"})
    _assert_422(r, "body", "not valid JSON")


def test_unknown_ids_404(stack):
    for url in ("/jobs/" + "f" * 32, "/jobs/not-an-id", "/jobs/" + "f" * 32 + "/events", "/adapters/nope",
                "/adapters/nope/download", "/images/" + "f" * 32 + "/0.png", "/images/../../etc/0.png",
                "/datasets/" + "f" * 32):
        r = stack.http.get(url)
        assert r.status_code == 404, (url, r.status_code, r.text)
        assert r.json()["detail"]
    assert stack.http.post("/jobs/" + "f" * 32 + "/cancel").status_code == 404
    assert stack.http.delete("/adapters/nope").status_code == 404
    assert "job_id" in stack.http.get("/jobs/" + "f" * 32).json()["detail"]


def test_finetune_field_errors(stack):
    ds = stack.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    assert ds.status_code == 201, ds.text
    good = {"name": "bad-input-adapter", "dataset_id": ds.json()["dataset_id"], "steps": 2}
    cases = [("steps", 0, "greater than or equal to 1"), ("steps", 1001, "steps: at most 1000"),
             ("learning_rate", 0, "greater than 0"), ("rank", 0, "greater than or equal to 1"),
             ("dropout", 1, "less than 1"), ("resolution", 30, "multiple of 8"),
             ("name", "bad name!", "pattern"), ("checkpoint_every", 3, "at most steps (2)"),
             ("dataset_id", "xyz", "pattern")]
    for field, value, words in cases:
        _assert_422(stack.http.post("/finetune", json={**good, field: value}), field, words)
    long = " ".join(["zebra"] * 60)
    _assert_422(stack.http.post("/finetune", json={**good, "validation_prompts": ["ok", long]}), "1", "tokens")
    _assert_422(stack.http.post("/finetune", json={"name": "x", "steps": 2}), "dataset_id", "required")
    r = stack.http.post("/finetune", json={**good, "dataset_id": "a" * 32})
    assert r.status_code == 404 and r.json()["detail"].startswith("dataset_id:")
    # multipart: the same validation on form fields
    r = stack.http.post("/finetune", data={"name": "mp", "steps": "zero"},
                        files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    _assert_422(r, "steps", "valid integer")
    r = stack.http.post("/finetune", data={"name": "mp", "steps": "2"})  # form-encoded: neither JSON nor multipart
    assert r.status_code == 415 and r.json()["detail"].startswith("content-type:")
    r = stack.http.post("/finetune", data={"name": "mp", "steps": "2"}, files={"nothing": ("", b"")})
    assert r.status_code == 422
    r = stack.http.post("/finetune", content=b'{"name": "nan-lr", "dataset_id": "%s", "learning_rate": NaN}'
                        % ds.json()["dataset_id"].encode(), headers={"content-type": "application/json"})
    _assert_422(r, "learning_rate", "finite number")
    r = stack.http.post("/finetune", data={"name": "mp", "steps": "2", "dataset_id": ds.json()["dataset_id"]},
                        files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    _assert_422(r, "dataset_id", "not both")


def test_upload_rejections_name_the_member(stack):
    cases = {
        "../escape.png": make_zip({"a.png": png_bytes(), "a.txt": b"x", "../escape.png": png_bytes()}),
        "link.png": make_zip({"a.png": png_bytes(), "a.txt": b"x"}, symlinks={"link.png": "/etc/passwd"}),
        "notimage.png": make_zip({"notimage.png": b"text", "notimage.txt": b"x"}),
    }
    for member, data in cases.items():
        r = stack.http.post("/datasets", files={"file": ("d.zip", data, "application/zip")})
        msg = _assert_422(r, "file", member)
        assert msg.startswith("file: ")
    before = sorted(p.name for p in (stack.data_dir / "datasets").iterdir())
    assert not any(n.startswith(".incoming") for n in before)  # nothing partial left behind
    assert not (stack.data_dir / "escape.png").exists() and not (stack.data_dir / "datasets" / "escape.png").exists()
    # the same checks guard multipart /finetune, and a rejected upload creates no job
    n_jobs = len(stack.http.get("/jobs", params={"limit": 500}).json()["jobs"])
    r = stack.http.post("/finetune", data={"name": "mp2", "steps": "2"},
                        files={"file": ("d.zip", cases["link.png"], "application/zip")})
    _assert_422(r, "file", "link.png")
    assert len(stack.http.get("/jobs", params={"limit": 500}).json()["jobs"]) == n_jobs


def test_upload_above_size_cap_413(stack):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored random bytes: the zip stays ~1.5 MB
        zf.writestr("a.png", png_bytes())
        zf.writestr("a.txt", "x")
        zf.writestr("pad.txt", os.urandom(1_500_000))
    big = buf.getvalue()
    r = stack.http.post("/datasets", files={"file": ("d.zip", big, "application/zip")})
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"] and r.json()["detail"].startswith("file:")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n\r\n'
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n" + boundary + b"--\r\n"

    r = stack.http.post("/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413, r.text
    assert not any(p.name.startswith(".incoming") for p in (stack.data_dir / "datasets").iterdir())


def test_cancel_finished_job_is_409(stack):
    r = stack.http.post("/generate?wait=30", json=GOOD)
    assert r.status_code == 200
    job_id = r.json()["job_id"]
    c = stack.http.post(f"/jobs/{job_id}/cancel")
    assert c.status_code == 409 and "already ended (succeeded)" in c.json()["detail"]
    assert stack.http.get(f"/jobs/{job_id}").json()["state"] == "succeeded"  # nothing lost
