"""Files on the data volume: GET /images/…, /adapters…, /jobs/{id}/validation/… — each only to the key that may
see the job or adapter it belongs to (`service.access`)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from jobs.volume import ADAPTER_FILES, ADAPTER_META, adapter_links, read_access, remove_tree, write_access
from service.access import adapter_of, job_of, readable_adapters
from service.deps import PrincipalDep, StoreDep, VolumeDep
from service.errors import not_found
from service.schemas import AdapterList, AdapterSummary

router = APIRouter()
MAX_INDEX = 10_000  # far above the images of one job; a longer number is simply not an image


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
