"""Files on the data volume: GET /images/…, /adapters…, /jobs/{id}/validation/…"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from jobs.volume import ADAPTER_FILES, ADAPTER_META, Volume, adapter_links, is_adapter_name, is_id, remove_tree
from service.deps import SettingsDep
from service.errors import not_found
from service.schemas import AdapterList

router = APIRouter()


@router.get("/images/{job_id}/{index}.png", tags=["images"], response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown job or image."}})
def get_image(job_id: str, index: int, settings: SettingsDep):
    """A generated image; its generation parameters are in the PNG's `parameters` text chunk."""
    path = Volume(settings.data_dir).image(job_id, index) if is_id(job_id) and index >= 0 else None
    if path is None or not path.is_file():
        raise not_found(f"image {job_id}/{index}.png not found")
    return FileResponse(path, media_type="image/png")


@router.get("/jobs/{job_id}/validation/{tag}/{filename}", tags=["jobs"], response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown job or image."}})
def get_validation_image(job_id: str, tag: str, filename: str, settings: SettingsDep):
    """A validation image a fine-tune made at a checkpoint (announced by its `validation` events)."""
    path = Volume(settings.data_dir).validation_image(job_id, tag, filename)
    if path is None or not path.is_file():
        raise not_found(f"validation image {job_id}/{tag}/{filename} not found")
    return FileResponse(path, media_type="image/png")


def _adapter_dir(settings, name: str):
    volume = Volume(settings.data_dir)
    if not volume.adapter_exists(name):
        raise not_found(f"name: adapter {name!r} not found")
    return volume.adapter(name)


def _summary(name: str, meta: dict) -> dict:
    return {**adapter_links(name), "created": meta.get("created"), "base_model": meta.get("base_model"),
            "steps": meta.get("steps") if isinstance(meta.get("steps"), int) else None}


@router.get("/adapters", tags=["adapters"], response_model=AdapterList)
def list_adapters(settings: SettingsDep):
    """Adapters published by finished fine-tunes."""
    root = Volume(settings.data_dir).adapters
    out: list[dict] = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if is_adapter_name(d.name) and (d / ADAPTER_META).is_file():
            try:
                out.append(_summary(d.name, json.loads((d / ADAPTER_META).read_text())))
            except (OSError, ValueError):
                continue  # deleted or being replaced while we listed
    return {"adapters": out}


@router.get("/adapters/{name}", tags=["adapters"], responses={404: {"description": "Unknown adapter."}})
def get_adapter(name: str, settings: SettingsDep) -> dict:
    """The adapter's adapter.json: base model, LoRA and training configuration, steps, dataset hash."""
    return json.loads((_adapter_dir(settings, name) / ADAPTER_META).read_text())


@router.get("/adapters/{name}/download", tags=["adapters"], response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}, "application/octet-stream": {}}},
                       404: {"description": "Unknown adapter or file."}})
def download_adapter(name: str, settings: SettingsDep,
                     file: str | None = Query(None, description="One file instead of the zip: "
                                              + ", ".join(ADAPTER_FILES) + " (empty: the zip)")):
    """The adapter as a zip (adapter.safetensors, pytorch_lora_weights.safetensors, adapter.json), or one file."""
    path = _adapter_dir(settings, name)
    if file:  # `?file=` with no value: the zip, as without it
        if file not in ADAPTER_FILES or not (path / file).is_file():
            raise not_found(f"file: {file!r} is not a file of adapter {name!r}")
        return FileResponse(path / file, filename=f"{name}-{file}")
    fd, tmp = tempfile.mkstemp(suffix=".zip")
    with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:  # safetensors don't compress
        for fname in ADAPTER_FILES:
            if (path / fname).is_file():
                zf.write(path / fname, f"{name}/{fname}")
    return FileResponse(tmp, media_type="application/zip", filename=f"{name}.zip",
                        background=BackgroundTask(os.unlink, tmp))


@router.delete("/adapters/{name}", tags=["adapters"], status_code=204,
               responses={404: {"description": "Unknown adapter."}})
def delete_adapter(name: str, settings: SettingsDep) -> Response:
    """Delete an adapter (it disappears at once: renamed aside, then removed)."""
    path = _adapter_dir(settings, name)
    try:
        remove_tree(path, prefix=".deleted-")
    except FileNotFoundError as e:
        raise not_found(f"name: adapter {name!r} not found") from e
    return Response(status_code=204)
