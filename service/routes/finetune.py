"""POST /finetune: JSON naming a dataset_id, or multipart with the zip itself."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from jobs import volume
from jobs.keys import Principal
from minidalle.params import checkpoint_interval
from service.access import dataset_of
from service.admission import admit, check_time_limit, cost_model
from service.deps import ModelInfoDep, PrincipalDep, QueueDep, SettingsDep, StoreDep, VolumeDep
from service.errors import conflict, invalid
from service.routes.datasets import UPLOAD_RESPONSES, ingest
from service.routes.generate import check_webhook
from service.schemas import FinetuneRequest, JobAccepted
from service.views import accepted

router = APIRouter(tags=["finetune"])

# the body is parsed by hand (JSON or multipart), so FastAPI doesn't register the model: inline its schema
_SCHEMA_REF = FinetuneRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_MULTIPART = {  # the same fields as the JSON body (derived from it), plus the zip itself
    "type": "object",
    "required": ["name", "file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "The dataset zip."},
                   **{k: v for k, v in _SCHEMA_REF["properties"].items() if k != "dataset_id"}},
}
OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {"schema": _SCHEMA_REF},
                                                         "multipart/form-data": {"schema": _MULTIPART}}}}


@router.post("/finetune", status_code=202, response_model=JobAccepted, openapi_extra=OPENAPI,
             responses={**UPLOAD_RESPONSES, 404: {"description": "Unknown dataset_id."},
                        409: {"description": "Adapter name taken."}})
async def finetune(request: Request, settings: SettingsDep, store: StoreDep, queue: QueueDep, model: ModelInfoDep,
                   principal: PrincipalDep, vol: VolumeDep):
    """Queue a LoRA (+ prior) fine-tune that publishes adapter `name` when it succeeds."""
    upload = None
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=64)  # a second file is refused below, by name
        fields: dict = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "file":
                    raise invalid(key, "unexpected file field; send the zip as 'file'")
                if upload is not None:
                    raise invalid("file", "send one zip, not several")
                upload = value
            elif key == "validation_prompts":
                fields.setdefault(key, []).append(value)
            elif value != "":  # an empty form field means "not given"
                fields[key] = value
        req = _validate(fields, strict=False)
        if upload is None and req.dataset_id is None:
            raise invalid("file", "upload the dataset zip as 'file' or give a dataset_id")
        if upload is not None and req.dataset_id is not None:
            raise invalid("dataset_id", "give either a dataset_id or the zip as 'file', not both")
    else:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid("body", f"not valid JSON ({e})") from e
        except RecursionError as e:  # json's parser is recursive: a deeply nested body would be a 500
            raise invalid("body", "nested too deeply") from e
        req = _validate(body, strict=True)
        if req.dataset_id is None:
            raise invalid("dataset_id", "required (or post multipart/form-data with the zip as 'file')")
    estimate = _check_caps(req, settings, model, store, vol)
    if upload is None:
        assert req.dataset_id is not None  # checked above
        dataset_of(vol, principal, req.dataset_id)  # 404 when unknown or another key's
        return await run_in_threadpool(_submit, req, settings, store, queue, principal, estimate)
    ds = await ingest(upload, settings, principal)  # a bad zip is rejected before any job exists
    return await run_in_threadpool(_submit, req.model_copy(update={"dataset_id": ds.dataset_id}), settings, store,
                                   queue, principal, estimate)


def _validate(data, *, strict: bool) -> FinetuneRequest:
    """JSON strictly (a number is a number); form fields are text, converted."""
    try:
        return FinetuneRequest.model_validate(data, strict=strict)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e


def _check_caps(req: FinetuneRequest, settings, model, store, vol) -> float:
    """The configurable caps, token limits, the name, the webhook and the cost; the estimate in seconds."""
    if req.steps > settings.max_train_steps:
        raise invalid("steps", f"at most {settings.max_train_steps}", req.steps)
    if req.batch_size > settings.max_train_batch_size:
        raise invalid("batch_size", f"at most {settings.max_train_batch_size}", req.batch_size)
    if req.resolution is not None and req.resolution > settings.max_train_resolution:
        raise invalid("resolution", f"at most {settings.max_train_resolution}", req.resolution)
    if req.lr_warmup_steps > req.steps:
        raise invalid("lr_warmup_steps", f"at most steps ({req.steps})", req.lr_warmup_steps)
    if req.checkpoint_every is not None and req.checkpoint_every > req.steps:
        raise invalid("checkpoint_every", f"at most steps ({req.steps})", req.checkpoint_every)
    for i, text in enumerate(req.validation_prompts):
        n = model.count_tokens(text)
        if n > model.max_prompt_tokens:
            raise invalid(f"validation_prompts.{i}", f"{n} tokens; the text encoder takes at most "
                          f"{model.max_prompt_tokens}", n)
    if vol.adapter_taken(req.name):  # names are one namespace: a taken name says so, whoever holds it
        raise conflict(f"name: adapter {req.name!r} already exists")
    check_webhook(req.webhook_url, settings)
    every = checkpoint_interval(req.steps, req.checkpoint_every)
    estimate = cost_model(store, settings, model).finetune_s(
        resolution=req.resolution or model.default_size, steps=req.steps, batch_size=req.batch_size,
        grad_accum=req.grad_accum, validation_prompts=len(req.validation_prompts),
        checkpoints=req.steps // every if every else 0)
    check_time_limit("finetune", estimate, settings, "steps", "lower steps, batch_size, grad_accum or resolution")
    return estimate


def _submit(req: FinetuneRequest, settings, store, queue, principal: Principal, estimate: float):
    assert req.dataset_id is not None  # given, or set from the upload
    vol = volume.Volume(settings.data_dir)
    job_id = volume.new_id()
    if not store.reserve_adapter_name(req.name, job_id):
        raise conflict(f"name: adapter {req.name!r} is being trained by another job")
    try:
        if vol.adapter_taken(req.name):  # published between the check and the hold
            raise conflict(f"name: adapter {req.name!r} already exists")
        volume.mark_used(vol.dataset(req.dataset_id))  # not swept while this job waits
        admit(store, queue, settings, principal, "finetune", req.model_dump(), estimate_s=estimate, job_id=job_id)
    except BaseException:
        store.release_adapter_name(req.name, job_id)
        raise
    return accepted(job_id)
