"""POST /datasets, GET /datasets/{id}."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, File, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from jobs.volume import DATASET_INFO, Volume, new_id
from service.datasets import Extracted, Limits, UploadRejected, extract_dataset
from service.deps import SettingsDep
from service.errors import invalid, not_found
from service.schemas import DatasetInfo

router = APIRouter(tags=["datasets"])
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {413: {"description": "Upload above the size cap."},
                    422: {"description": "Unsafe or invalid archive; the message names the member."}}


async def ingest(upload: StarletteUpload, settings) -> Extracted:
    """Validate and extract an uploaded zip into datasets/{new id}/ (off the event loop)."""
    limits = Limits(max_members=settings.max_zip_members, max_uncompressed_bytes=settings.max_uncompressed_bytes,
                    max_image_pixels=settings.max_image_pixels)
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise HTTPException(413, f"file: the upload is {upload.size} bytes; at most {settings.max_upload_bytes}")
    try:
        return await run_in_threadpool(extract_dataset, upload.file, Volume(settings.data_dir).datasets, new_id(),
                                       limits)
    except UploadRejected as e:
        raise invalid(e.field, e.message, upload.filename) from e


@router.post("/datasets", status_code=201, response_model=DatasetInfo, responses=UPLOAD_RESPONSES)
async def create_dataset(settings: SettingsDep, file: UploadFile = File(
        description="A zip of images with captions: metadata.jsonl (file_name, text) or img.png + img.txt pairs.")):
    """Upload a training dataset; it is safely extracted and validated before an id is given."""
    ds = await ingest(file, settings)
    return {"dataset_id": ds.dataset_id, "images": ds.images, "warnings": ds.warnings}


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, responses={404: {"description": "Unknown."}})
def get_dataset(dataset_id: str, settings: SettingsDep):
    """What an uploaded dataset holds."""
    path = dataset_path(settings, dataset_id)
    info = json.loads((path / DATASET_INFO).read_text())
    return {"dataset_id": dataset_id, "images": info["images"], "warnings": info["warnings"]}


def dataset_path(settings, dataset_id: str):
    volume = Volume(settings.data_dir)
    if not volume.dataset_exists(dataset_id):
        raise not_found(f"dataset_id: dataset {dataset_id!r} not found")
    return volume.dataset(dataset_id)
