"""POST /datasets, GET /datasets/{id}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from jobs.keys import Principal
from jobs.volume import DATASET_INFO, Volume, dataset_owner, new_id, read_access, subdirs, tree_bytes
from service.access import dataset_of
from service.datasets import Extracted, Limits, UploadRejected, extract_dataset
from service.deps import PrincipalDep, SettingsDep, VolumeDep
from service.errors import invalid
from service.schemas import DatasetInfo

router = APIRouter(tags=["datasets"])
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"description": "Upload above the size cap (the service's or this key's)."},
    422: {"description": "Unsafe or invalid archive; the message names the member."},
    429: {"description": "This key's disk quota (datasets + adapters) is used up."}}


def stored_bytes(volume: Volume, owner: str) -> dict[str, int]:
    """What a key keeps on the data volume: its datasets and its adapters, in bytes."""
    def owned(root: Path, owner_of) -> int:
        return sum(tree_bytes(d) for d in subdirs(root) if not d.name.startswith(".") and owner_of(d) == owner)

    datasets = owned(volume.datasets, dataset_owner)
    adapters = owned(volume.adapters, lambda d: read_access(d)["owner"])
    return {"datasets": datasets, "adapters": adapters, "total": datasets + adapters}


def upload_cap(settings, principal: Principal) -> int:
    """The largest upload this key may send: the service's cap, or the key's own when it is lower."""
    return min(settings.max_upload_bytes, principal.limits.upload_bytes or settings.max_upload_bytes)


async def check_quota(volume: Volume, principal: Principal, settings, adding: int) -> None:
    """429 when what the key stores (datasets + adapters) and `adding` bytes more exceed its disk quota."""
    if principal.anonymous:
        return
    quota = principal.limits.disk_bytes or settings.key_disk_bytes
    used = (await run_in_threadpool(stored_bytes, volume, principal.id))["total"]
    if used + adding > quota:
        raise HTTPException(429, f"file: this key stores {used} bytes of datasets and adapters; its quota is "
                            f"{quota} (delete some to make room)", headers={"Retry-After": "3600"})


async def ingest(upload: StarletteUpload, settings, principal: Principal) -> Extracted:
    """Validate and extract an uploaded zip into datasets/{new id}/ (off the event loop), owned by the key."""
    limits = Limits(max_members=settings.max_zip_members, max_uncompressed_bytes=settings.max_uncompressed_bytes,
                    max_image_pixels=settings.max_image_pixels, max_total_pixels=settings.max_upload_pixels)
    cap = upload_cap(settings, principal)
    if upload.size is not None and upload.size > cap:
        raise HTTPException(413, f"file: the upload is {upload.size} bytes; at most {cap}")
    volume = Volume(settings.data_dir)
    await check_quota(volume, principal, settings, upload.size or 0)
    try:
        return await run_in_threadpool(extract_dataset, upload.file, volume.datasets, new_id(), limits,
                                       principal.id)
    except UploadRejected as e:
        raise invalid(e.field, e.message, upload.filename) from e


@router.post("/datasets", status_code=201, response_model=DatasetInfo, responses=UPLOAD_RESPONSES)
async def create_dataset(request: Request, settings: SettingsDep, principal: PrincipalDep, file: UploadFile = File(
        description="A zip of images with captions: metadata.jsonl (file_name, text) or img.png + img.txt pairs.")):
    """Upload a training dataset; it is safely extracted and validated before an id is given."""
    form = await request.form()  # already parsed for `file`: not read twice
    if len(form.getlist("file")) > 1:
        raise invalid("file", "send one zip, not several")
    ds = await ingest(file, settings, principal)
    return {"dataset_id": ds.dataset_id, "images": ds.images, "warnings": ds.warnings}


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, responses={404: {"description": "Unknown."}})
def get_dataset(dataset_id: str, volume: VolumeDep, principal: PrincipalDep):
    """What an uploaded dataset holds."""
    path = dataset_of(volume, principal, dataset_id)
    info = json.loads((path / DATASET_INFO).read_text())
    return {"dataset_id": dataset_id, "images": info["images"], "warnings": info["warnings"]}
