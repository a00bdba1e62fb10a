"""The OpenAPI document, completed so generated clients know every answer's body: FastAPI leaves a response the
routes describe in words (`responses={404: {"description": …}}`) without a schema. Here every error answer gets
the body the service really sends — `{"detail": [{loc, msg, type, input}]}` for a 422 (FastAPI's own shape, which
`service.errors` keeps), `{"detail": "…"}` for the others — and every image or file answer is declared as binary."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

VALIDATION_ERROR = {  # FastAPI's own component, spelled out so the document has it even if no route made it
    "title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
    "properties": {"loc": {"title": "Location", "type": "array",
                           "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                   "msg": {"title": "Message", "type": "string",
                           "description": "Starts with the field's name: `num_images: at most 8`."},
                   "type": {"title": "Error Type", "type": "string"},
                   "input": {"title": "Input", "description": "What was sent (at most 200 characters of it)."}},
}
HTTP_VALIDATION_ERROR = {"title": "HTTPValidationError", "type": "object",
                         "properties": {"detail": {"title": "Detail", "type": "array",
                                                   "items": {"$ref": "#/components/schemas/ValidationError"}}}}
ERROR = {"title": "Error", "type": "object", "required": ["detail"],
         "properties": {"detail": {"title": "Detail", "type": "string",
                                   "description": "What went wrong, naming the field or thing concerned."}}}
BINARY = {"type": "string", "format": "binary"}
BINARY_TYPES = ("image/", "application/zip", "application/octet-stream")


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ValidationError", VALIDATION_ERROR)
    schemas.setdefault("HTTPValidationError", HTTP_VALIDATION_ERROR)
    schemas.setdefault("Error", ERROR)
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            for code, response in op.get("responses", {}).items():
                content = response.get("content")
                if code[0] in "45" and not content:
                    ref = "HTTPValidationError" if code == "422" else "Error"
                    response["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
                for media, body in (content or {}).items():
                    if media.startswith(BINARY_TYPES) and body.get("schema", {}).get("format") != "binary":
                        body["schema"] = dict(BINARY)
    return spec


def install(app: FastAPI) -> None:
    """`app.openapi()` answers the completed document (built once, as FastAPI does)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(get_openapi(title=app.title, version=app.version,
                                                      description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
