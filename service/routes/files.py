"""Files on the data volume: GET /images/…, /adapters…, /jobs/{id}/validation/… — each only to the key that may
see the job or adapter it belongs to (`service.access`); POST /adapters brings a LoRA made elsewhere in."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from jobs.keys import Principal
from jobs.store import TERMINAL
from jobs.volume import (
    ADAPTER_FILES,
    ADAPTER_META,
    Volume,
    adapter_links,
    new_id,
    read_access,
    remove_tree,
    write_access,
)
from minidalle.params import ADAPTER_NAME_PATTERN, check_adapter_name
from service.access import adapter_of, job_of, readable_adapters
from service.admission import admit, precheck
from service.deps import HubDep, PrincipalDep, QueueDep, SettingsDep, StoreDep, VolumeDep
from service.errors import STORE_DOWN, conflict, invalid, not_found
from service.lora_upload import store_upload
from service.routes.datasets import check_quota, upload_cap
from service.schemas import AdapterList, AdapterSummary, ImportRequest, JobAccepted
from service.views import accepted, wait_for_end

log = logging.getLogger(__name__)
router = APIRouter()
MAX_INDEX = 10_000  # far above the images of one job; a longer number is simply not an image
IMPORT_ESTIMATE_S = 5.0  # reading, converting and checking one LoRA file (an SD 1.5 one is ~100 MB) on a worker
# the adapter keeps the LoRA three times (ours, diffusers', kohya's): what an import adds to the key's disk use
STORED_COPIES = 3


@router.get("/images/{job_id}/{index}.png", tags=["images"], response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown job or image."}})
def get_image(job_id: str, store: StoreDep, volume: VolumeDep, principal: PrincipalDep,
              index: int = PathParam(description="The image's index in its job, from 0.")):
    """A generated image; its generation parameters are in the PNG's `parameters` text chunk."""
    job_of(store, principal, job_id)
    path = volume.image(job_id, index) if 0 <= index <= MAX_INDEX else None
    if path is None or not path.is_file():
        raise not_found(f"image {job_id}/{index}.png not found")
    return FileResponse(path, media_type="image/png")


@router.get("/jobs/{job_id}/validation/{tag}/{filename}", tags=["jobs"], response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown job or image."}})
def get_validation_image(job_id: str, tag: str, filename: str, store: StoreDep, volume: VolumeDep,
                         principal: PrincipalDep):
    """A validation image a fine-tune made at a checkpoint (announced by its `validation` events)."""
    job_of(store, principal, job_id)
    path = volume.validation_image(job_id, tag, filename)
    if path is None or not path.is_file():
        raise not_found(f"validation image {job_id}/{tag}/{filename} not found")
    return FileResponse(path, media_type="image/png")


def _summary(name: str, meta: dict, access: dict, principal) -> dict:
    return {**adapter_links(name), "created": meta.get("created"), "base_model": meta.get("base_model"),
            "steps": meta.get("steps") if isinstance(meta.get("steps"), int) else None,
            "visibility": access["visibility"], "mine": access["owner"] == principal.id}


@router.get("/adapters", tags=["adapters"], response_model=AdapterList)
def list_adapters(volume: VolumeDep, principal: PrincipalDep):
    """The adapters this key may use: its own, those shared with every key, and (an admin key) all."""
    return {"adapters": [_summary(n, meta, access, principal) for n, meta, access in
                         readable_adapters(volume, principal)]}


_IMPORT_FORM = {
    "type": "object",
    "required": ["file", "name"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "The LoRA, a .safetensors file: kohya / A1111 (lora_unet_* keys with .alpha), "
                                "diffusers (pytorch_lora_weights.safetensors) or peft keys. Other files (.pt, .ckpt: "
                                "pickles) are refused unread."},
        "name": {"type": "string", "pattern": ADAPTER_NAME_PATTERN,
                 "description": "The adapter's name (one namespace for every key)."},
    },
}
IMPORT_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _IMPORT_FORM}}}}


@router.post("/adapters", tags=["adapters"], status_code=201, response_model=AdapterSummary,
             openapi_extra=IMPORT_OPENAPI,
             responses={202: {"model": JobAccepted, "description": "The import job did not end within `wait` seconds; "
                                                                    "follow it."},
                        409: {"description": "Adapter name taken, or being published by another job."},
                        413: {"description": "Upload above the size cap (the service's or this key's)."},
                        415: {"description": "Not multipart/form-data."},
                        422: {"description": "A bad name, not a safetensors file, or a LoRA this model can't use (the "
                                               "message names the field and the keys: LyCORIS, text encoder, shapes)."},
                        429: {"description": "The queue is full, or this key's limits or disk quota are used up."}})
async def import_adapter(request: Request, settings: SettingsDep, store: StoreDep, queue: QueueDep, hub: HubDep,
                         principal: PrincipalDep, vol: VolumeDep,
                         wait: float | None = Query(None, ge=0, description="Seconds to wait for the import before "
                                                    "answering 202 (default: the service's longest wait).")):
    """Import a LoRA made elsewhere: checked against the base model on a worker, then an adapter like a trained one."""
    wait_s = settings.max_wait_s if wait is None else wait
    if wait_s > settings.max_wait_s:
        raise invalid("wait", f"at most {settings.max_wait_s} seconds", wait, where="query")
    upload, name = await _import_form(request)
    check_adapter_name(name)  # 422 naming `name`
    if vol.adapter_taken(name):  # names are one namespace: a taken name says so, whoever holds it
        raise conflict(f"name: adapter {name!r} already exists")
    cap = upload_cap(settings, principal)
    if upload.size is not None and upload.size > cap:
        raise HTTPException(413, f"file: the upload is {upload.size} bytes; at most {cap}")
    await check_quota(vol, principal, settings, STORED_COPIES * (upload.size or 0))
    await precheck(hub.pool, settings, "import")
    upload_id, filename = new_id(), _display_name(upload.filename)
    try:  # checked (safetensors framing, torch-free) and stored, then queued; a refusal leaves nothing behind
        await run_in_threadpool(store_upload, upload.file, vol.upload_file(upload_id), cap=cap, filename=filename)
        req = ImportRequest(name=name, upload_id=upload_id, filename=filename)
        job_id = await run_in_threadpool(_submit_import, req, settings, store, queue, principal, vol)
    except BaseException:
        shutil.rmtree(vol.upload(upload_id), ignore_errors=True)
        raise
    try:
        job = await wait_for_end(hub, job_id, wait_s, principal.id) if wait_s else None
    except STORE_DOWN:  # the job exists: say so (202), a retry would upload it again
        log.warning("job %s: waiting for it failed; answering 202", job_id, exc_info=True)
        job = None
    return _import_answer(job_id, job, name, vol, principal)


async def _import_form(request: Request) -> tuple[UploadFile, str]:
    """The form's one `file` and its `name`; anything else is refused by name."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "content-type: send multipart/form-data with the LoRA as 'file' and a 'name'")
    form = await request.form(max_files=2, max_fields=8)  # a second file is refused below, by name
    upload, name = None, None
    for key, value in form.multi_items():
        if key == "file" and isinstance(value, UploadFile):
            if upload is not None:
                raise invalid("file", "send one LoRA file, not several")
            upload = value
        elif key == "name" and isinstance(value, str):
            name = value
        else:
            raise invalid(key, "unexpected form field; send the LoRA as 'file' and its adapter name as 'name'")
    if upload is None:
        raise invalid("file", "required: the LoRA .safetensors file")
    if not name:
        raise invalid("name", "required: the adapter's name")
    return upload, name


def _display_name(filename: str | None) -> str:
    """The client's file name as messages show it: its last part, printable, short."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    text = "".join(c for c in base.encode("utf-8", "replace").decode("utf-8") if unicodedata.category(c)[0] != "C")
    return text[:100] or "the file"


def _submit_import(req: ImportRequest, settings, store, queue, principal: Principal, vol: Volume) -> str:
    job_id = new_id()
    if not store.reserve_adapter_name(req.name, job_id):
        raise conflict(f"name: adapter {req.name!r} is being published by another job")
    try:
        if vol.adapter_taken(req.name):  # published between the check and the hold
            raise conflict(f"name: adapter {req.name!r} already exists")
        return admit(store, queue, settings, principal, "import", req.model_dump(), estimate_s=IMPORT_ESTIMATE_S,
                     job_id=job_id)
    except BaseException:
        store.release_adapter_name(req.name, job_id)
        raise


def _import_answer(job_id: str, job: dict | None, name: str, vol: Volume, principal: Principal):
    """201 with the adapter; 202 while the job runs on; the job's own error when it refused the file."""
    if job is None or job["state"] not in TERMINAL:
        return JSONResponse(accepted(job_id, job["state"] if job else "queued"), status_code=202)
    if job["state"] == "succeeded":
        path = adapter_of(vol, principal, name)
        return _summary(name, json.loads((path / ADAPTER_META).read_text()), read_access(path), principal)
    if job["state"] == "cancelled":
        raise conflict(f"job_id: the import job {job_id} was cancelled")
    error = job["error"] or "failed"
    field, _, message = error.partition(": ")
    if field == "name":  # published meanwhile, by someone else
        raise conflict(error)
    if field == "file":
        raise invalid("file", message)
    raise HTTPException(500, f"the import job {job_id} failed: {error}")


@router.get("/adapters/{name}", tags=["adapters"], responses={404: {"description": "Unknown adapter."}})
def get_adapter(name: str, volume: VolumeDep, principal: PrincipalDep) -> dict:
    """The adapter's adapter.json: base model, LoRA and training configuration, steps, dataset hash."""
    return json.loads((adapter_of(volume, principal, name) / ADAPTER_META).read_text())


class AdapterChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    visibility: Literal["private", "public"]


@router.patch("/adapters/{name}", tags=["adapters"], response_model=AdapterSummary,
              responses={403: {"description": "Shared read-only with this key."},
                         404: {"description": "Unknown adapter."}})
def change_adapter(name: str, change: AdapterChange, volume: VolumeDep, principal: PrincipalDep):
    """Share an adapter read-only with every key (`"visibility": "public"`) or make it private again."""
    path = adapter_of(volume, principal, name, write=True)
    owner = read_access(path)["owner"]
    write_access(path, owner=owner, visibility=change.visibility)
    meta = json.loads((path / ADAPTER_META).read_text())
    return _summary(name, meta, read_access(path), principal)


@router.get("/adapters/{name}/download", tags=["adapters"], response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}},
                                         "application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}},
                       404: {"description": "Unknown adapter or file."}})
def download_adapter(name: str, volume: VolumeDep, principal: PrincipalDep,
                     file: str | None = Query(None, description="One file instead of the zip: "
                                              + ", ".join(ADAPTER_FILES) + " (empty: the zip)")):
    """The adapter as a zip (adapter.safetensors, pytorch_lora_weights.safetensors, adapter.json), or one file."""
    path = adapter_of(volume, principal, name)
    if file:  # `?file=` with no value: the zip, as without it
        if file not in ADAPTER_FILES or not (path / file).is_file():
            raise not_found(f"file: {file!r} is not a file of adapter {name!r}")
        return FileResponse(path / file, filename=f"{name}-{file}")
    members = [(f"{name}/{f}", path / f) for f in ADAPTER_FILES if (path / f).is_file()]
    return StreamingResponse(_zip_stream(members), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})


class _Chunks(io.RawIOBase):
    """A write-only, unseekable file that keeps what was written until it is taken: zipfile writes a streamable
    archive (data descriptors) into it, and the response sends each piece as it comes."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.pieces.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self.pieces = b"".join(self.pieces), []
        return out


def _zip_stream(members: list[tuple[str, Path]]) -> Iterator[bytes]:
    """The zip, produced while it is sent: no temporary copy, memory bounded by one read."""
    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:  # safetensors don't compress
        for arcname, src in members:
            info = zipfile.ZipInfo(arcname, date_time=time.localtime(src.stat().st_mtime)[:6])
            with open(src, "rb") as f, zf.open(info, "w", force_zip64=src.stat().st_size > 2**31) as dst:
                while chunk := f.read(1 << 20):
                    dst.write(chunk)
                    yield sink.take()
    yield sink.take()


@router.delete("/adapters/{name}", tags=["adapters"], status_code=204,
               responses={403: {"description": "Shared read-only with this key."},
                          404: {"description": "Unknown adapter."}})
def delete_adapter(name: str, volume: VolumeDep, principal: PrincipalDep) -> Response:
    """Delete an adapter (it disappears at once: renamed aside, then removed)."""
    path = adapter_of(volume, principal, name, write=True)
    try:
        remove_tree(path, prefix=".deleted-")
    except FileNotFoundError as e:
        raise not_found(f"name: adapter {name!r} not found") from e
    return Response(status_code=204)
