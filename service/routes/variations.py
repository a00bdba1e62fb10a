"""POST /variations: images like an uploaded one (DALL·E 2's variations). The image is decoded safely, as dataset
images are (format, pixel count, decompression bombs, a whole decode), re-encoded as an RGB PNG on the data volume
(nothing of the upload's own bytes or metadata is kept), and becomes a `generate` job like any other: the same
admission, caps, queue, batching (with variations of the same settings), ownership and usage. The worker makes its
CLIP image embedding the UNet's image tokens."""

from __future__ import annotations

import os
import shutil
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from jobs.keys import Principal
from jobs.requests import VariationRequest
from jobs.volume import Volume, new_id
from service.admission import precheck
from service.datasets import UploadRejected, check_image
from service.deps import HubDep, ModelInfoDep, PrincipalDep, QueueDep, SettingsDep, StoreDep, VolumeDep
from service.errors import invalid
from service.routes.datasets import upload_cap
from service.routes.generate import _submit, answer
from service.schemas import JobAccepted

router = APIRouter(tags=["generate"])

# the form's fields: every VariationRequest field a client may set, by the type its value is read as
FORM_FIELDS: dict[str, type] = {"prompt": str, "negative_prompt": str, "num_images": int, "num_inference_steps": int,
                                "guidance_scale": float, "seed": int, "width": int, "height": int, "scheduler": str,
                                "ip_adapter_scale": float, "webhook_url": str}
assert set(FORM_FIELDS) <= set(VariationRequest.model_fields)
_FORM_SCHEMA = {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary", "description": "The image: PNG, JPEG, WEBP or BMP."},
    **{name: {"type": {int: "integer", float: "number", str: "string"}[t],
              "description": VariationRequest.model_fields[name].description or ""}
       for name, t in FORM_FIELDS.items()}}}


@router.post("/variations", status_code=202, response_model=JobAccepted,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                 "schema": _FORM_SCHEMA}}}},
             responses={200: {"model": JobAccepted, "description": "Finished within `wait` seconds."},
                        413: {"description": "The image is larger than the upload cap."},
                        415: {"description": "Not a multipart form."},
                        422: {"description": "Invalid field (the message names it): `file` when the image can't be "
                                             "decoded or is too large."},
                        429: {"description": "The queue or this key's limits are full; see Retry-After."}})
async def variations(request: Request, settings: SettingsDep, store: StoreDep, queue: QueueDep, hub: HubDep,
                     model: ModelInfoDep, principal: PrincipalDep, volume: VolumeDep,
                     wait: float = Query(0, ge=0, description="Seconds to wait for the images before answering 202.")):
    """Queue variations of an uploaded image (multipart: `file` and optional generate fields); like /generate."""
    if wait > settings.max_wait_s:
        raise invalid("wait", f"at most {settings.max_wait_s} seconds", wait, where="query")
    upload, fields = await _form(request)
    try:
        req = VariationRequest(image_id=new_id(), **fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "form"
        raise invalid(name, str(err.get("msg", "invalid")), fields.get(name)) from None
    if not (model.has_image_encoder and model.has_ip_adapter):
        raise invalid("file", "this model has no image encoder and IP-Adapter (image_encoder/, ip_adapter/): it "
                      "can't make variations")
    cap = upload_cap(settings, principal)
    if upload.size is not None and upload.size > cap:
        raise HTTPException(413, f"file: the upload is {upload.size} bytes; at most {cap}")
    await precheck(hub.pool, settings, "generate")
    async with request.app.state.submit_slots:
        job_id = await run_in_threadpool(_submit_variation, upload, req, settings, store, queue, model, principal,
                                         volume)
    return await answer(hub, job_id, wait, principal)


async def _form(request: Request) -> tuple[UploadFile, dict[str, Any]]:
    """The form's one `file` and its fields, read as their types; anything else is refused by name."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "content-type: send multipart/form-data with the image as 'file'")
    form = await request.form(max_files=2, max_fields=len(FORM_FIELDS) + 2)
    upload, fields = None, {}
    for key, value in form.multi_items():
        if key == "file" and isinstance(value, UploadFile):
            if upload is not None:
                raise invalid("file", "send one image, not several")
            upload = value
        elif key in FORM_FIELDS and isinstance(value, str) and key not in fields:
            fields[key] = _parse(key, value)
        else:
            raise invalid(key, f"unexpected form field; send 'file' and any of {', '.join(FORM_FIELDS)}, once each")
    if upload is None:
        raise invalid("file", "required: the image to make variations of")
    return upload, fields


def _parse(key: str, value: str) -> Any:
    kind = FORM_FIELDS[key]
    if kind is str:
        return value
    try:
        return kind(value)
    except ValueError:
        raise invalid(key, f"must be {'an integer' if kind is int else 'a number'}", value[:100]) from None


def _submit_variation(upload: UploadFile, req: VariationRequest, settings, store, queue, model,
                      principal: Principal, vol: Volume) -> str:
    """Decode-check the image, re-encode it at uploads/{image_id}/image.png, then admit the job; on any refusal
    nothing is left on the volume."""
    image_id = req.image_id
    folder = vol.upload(image_id)
    folder.mkdir(parents=True, exist_ok=False)  # a fresh id: never someone else's
    try:
        raw = folder / ".incoming"
        with open(raw, "xb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, 1 << 20)
        try:
            check_image(raw, upload.filename or "file", settings.max_image_pixels, settings.max_image_pixels)
        except UploadRejected as e:
            raise invalid("file", e.message.replace("member ", "", 1), upload.filename) from None
        from PIL import Image

        with Image.open(raw) as im:
            im.convert("RGB").save(vol.upload_image(image_id), format="PNG")
        os.unlink(raw)
        return _submit(req, settings, store, queue, model, principal, vol)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
