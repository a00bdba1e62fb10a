"""Input a hostile or careless client sends gets a 4xx naming the problem, never a 500 or a dropped connection,
and nothing large or unencodable is echoed back."""

from __future__ import annotations

import pytest
from _support.fixtures import make_zip, png_bytes, wait_job

JSON = {"content-type": "application/json"}
DEEP = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


def _field(r, field: str) -> dict:
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if e["loc"][-1] == field or e["loc"] == ["body"]]
    assert errors, r.text
    return errors[0]


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "x", "scheduler": "\\ud800"}', "scheduler"),  # a lone surrogate, echoed
    (b'{"prompt": "\\ud800 a cat"}', "prompt"),
    (b'{"prompt": "x", "negative_prompt": "\\udfff"}', "negative_prompt"),
])
def test_lone_surrogates_are_refused_by_name(stack, body, field):
    err = _field(stack.http.post("/generate", content=body, headers=JSON), field)
    assert "\\ud" not in str(err.get("input"))  # replaced, so the answer could be encoded at all


def test_lax_coercions_are_refused(stack):
    for value in (True, "2", 2.0):
        err = _field(stack.http.post("/generate", json={"prompt": "x", "num_images": value}), "num_images")
        assert err["type"] == "int_type"
    _field(stack.http.post("/generate", json={"prompt": "x", "guidance_scale": "7"}), "guidance_scale")
    _field(stack.http.post("/generate", json={"prompt": "x", "adapters": [{"name": "a", "scale": "1"}]}), "scale")
    _field(stack.http.post("/finetune", json={"name": "n", "dataset_id": "0" * 32, "steps": "5"}), "steps")


def test_deep_json_is_a_4xx(stack):
    r = stack.http.post("/finetune", content=DEEP, headers=JSON)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"] and "nested" in r.text
    assert stack.http.post("/generate", content=DEEP, headers=JSON).status_code == 400


def test_a_finetune_json_body_is_capped_like_generate(stack):
    big = b'{"name": "big", "dataset_id": "' + b"0" * 32 + b'", "validation_prompts": ["' + b"x" * (2 << 20) + b'"]}'
    r = stack.http.post("/finetune", content=big, headers=JSON)
    assert r.status_code == 413 and "request body is larger" in r.json()["detail"], r.text[:200]


def test_a_large_input_is_not_echoed(stack):
    r = stack.http.post("/generate", json={"prompt": "x", "scheduler": "y" * 100_000})
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)


def test_archive_member_names_and_nesting(stack):
    long = make_zip({"a" * 300 + ".png": png_bytes(), "a" * 300 + ".txt": b"x"})
    err = _field(stack.http.post("/datasets", files={"file": ("d.zip", long, "application/zip")}), "file")
    assert "at most 200 bytes" in err["msg"]
    nested = make_zip({"a.png": png_bytes(), "metadata.jsonl":
                       b'{"file_name": "a.png", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"})
    err = _field(stack.http.post("/datasets", files={"file": ("d.zip", nested, "application/zip")}), "file")
    assert "nested too deeply" in err["msg"]
    deep_dirs = make_zip({"/".join(["d"] * 40) + "/a.png": png_bytes(), "/".join(["d"] * 40) + "/a.txt": b"x"})
    _field(stack.http.post("/datasets", files={"file": ("d.zip", deep_dirs, "application/zip")}), "file")


def test_two_file_parts_are_refused(stack):
    two = [("file", ("a.zip", b"x", "application/zip")), ("file", ("b.zip", b"y", "application/zip"))]
    assert "send one zip" in _field(stack.http.post("/datasets", files=two), "file")["msg"]
    r = stack.http.post("/finetune", data={"name": "two"}, files=two)
    assert "send one zip" in _field(r, "file")["msg"]


def test_a_huge_image_index_is_404(stack):
    r = stack.http.post("/generate", json={"prompt": "x", "num_inference_steps": 1})
    job = wait_job(stack.http, r.json()["job_id"])
    assert stack.http.get(f"/images/{job['id']}/{'9' * 300}.png").status_code == 404
    assert stack.http.get(f"/images/{job['id']}/-1.png").status_code == 404
    assert stack.http.get(f"/images/{job['id']}/0.png").status_code == 200


def test_an_upload_has_a_total_pixel_budget(tmp_path):
    import io

    from service.datasets import Limits, UploadRejected, extract_dataset

    files = {f"{i}.png": png_bytes(size=(64, 64)) for i in range(4)} | {f"{i}.txt": b"x" for i in range(4)}
    limits = Limits(max_members=100, max_uncompressed_bytes=10**8, max_image_pixels=64 * 64,
                    max_total_pixels=3 * 64 * 64)
    with pytest.raises(UploadRejected) as e:
        extract_dataset(io.BytesIO(make_zip(files)), tmp_path / "datasets", "0" * 32, limits)
    assert "pixel budget" in str(e.value) and not (tmp_path / "datasets" / ("0" * 32)).exists()
