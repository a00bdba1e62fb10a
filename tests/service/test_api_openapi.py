"""The OpenAPI document as generated clients and Swagger's "Try it out" use it: each request example succeeds as
given against a fresh service, every error answer has a body schema, and files are declared binary."""

from __future__ import annotations

from _support.fixtures import shapes_dataset_zip

BINARY_TYPES = ("image/", "application/zip", "application/octet-stream")


def _spec(stack) -> dict:
    r = stack.http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _json_examples(spec: dict):
    """(method, path, example) for every JSON request body whose schema carries examples."""
    schemas = spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if not body:
                continue
            schema = body["schema"]
            if "$ref" in schema:
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
            for example in schema.get("examples", []):
                yield method, path, example


def test_every_request_example_succeeds_as_given(stack):
    spec = _spec(stack)
    examples = list(_json_examples(spec))
    assert {(m, p) for m, p, _ in examples} >= {("post", "/generate"), ("post", "/finetune"),
                                                 ("post", "/sdapi/v1/txt2img")}
    for method, path, example in examples:
        if path == "/finetune":
            # the one example that names something made before: the dataset of `POST /datasets`, whose file
            # Swagger can't pre-fill. Everything else in it is used as given
            r = stack.http.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
            assert r.status_code == 201, r.text
            example = {**example, "dataset_id": r.json()["dataset_id"]}
        r = stack.http.request(method, path, json=example, timeout=120)
        assert 200 <= r.status_code < 300, (path, r.status_code, r.text)
        if r.status_code == 202 and "cancel_url" in r.json():  # don't leave a fine-tune on the shared worker
            stack.http.post(r.json()["cancel_url"])


def test_every_answer_has_its_body_schema_and_files_are_binary(stack):
    spec = _spec(stack)
    schemas = spec["components"]["schemas"]
    assert schemas["HTTPValidationError"]["properties"]["detail"]["items"] == {
        "$ref": "#/components/schemas/ValidationError"}
    missing, not_binary = [], []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                content = response.get("content") or {}
                if code[0] in "45" and "application/json" not in content:
                    missing.append((method, path, code))
                if code == "422":
                    assert content["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/HTTPValidationError"}, (method, path)
                for media, body in content.items():
                    if media.startswith(BINARY_TYPES) and body.get("schema", {}).get("format") != "binary":
                        not_binary.append((method, path, media))
    assert not missing and not not_binary, (missing, not_binary)
    image = spec["paths"]["/images/{job_id}/{index}.png"]["get"]["responses"]["200"]["content"]["image/png"]
    assert image["schema"] == {"type": "string", "format": "binary"}
    # and the 422 the service sends has the documented shape
    r = stack.http.post("/generate", json={"prompt": "a circle", "num_images": 0})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert set(schemas["ValidationError"]["required"]) <= set(error) and error["loc"] == ["body", "num_images"]

