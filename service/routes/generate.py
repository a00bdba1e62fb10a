"""POST /generate."""

from __future__ import annotations

import logging
import secrets

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from jobs.store import TERMINAL
from jobs.volume import Volume
from service.deps import AsyncRedisDep, ModelInfoDep, QueueDep, SettingsDep, StoreDep
from service.errors import STORE_DOWN, invalid, not_found
from service.schemas import GenerateRequest, JobAccepted
from service.views import accepted, enqueue_recorded, wait_for_end

log = logging.getLogger(__name__)
router = APIRouter(tags=["generate"])


@router.post("/generate", status_code=202, response_model=JobAccepted,
             responses={200: {"model": JobAccepted, "description": "Finished within `wait` seconds."},
                        404: {"description": "An adapter named in `adapters` does not exist."},
                        422: {"description": "Invalid field (the message names it)."}})
async def generate(req: GenerateRequest, settings: SettingsDep, store: StoreDep, queue: QueueDep,
                   aredis: AsyncRedisDep, model: ModelInfoDep,
                   wait: float = Query(0, ge=0, description="Seconds to wait for the images before answering 202.")):
    """Queue a text-to-image job; 202 with its links, or 200 with the finished job when it ends within `wait`."""
    if wait > settings.max_wait_s:
        raise invalid("wait", f"at most {settings.max_wait_s} seconds", wait, where="query")
    # tokenizer and blocking I/O: a thread
    job_id = await run_in_threadpool(_submit, req, settings, store, queue, model)
    # the wait holds no thread: a thousand waiting clients must not starve the threadpool the other routes use
    try:
        job = await wait_for_end(aredis, job_id, wait) if wait else None
    except STORE_DOWN:  # the job exists: say so (202), a retry would make a second one
        log.warning("job %s: waiting for it failed; answering 202", job_id, exc_info=True)
        job = None
    if job is not None and job["state"] in TERMINAL:
        return JSONResponse(accepted(job_id, job["state"], job), status_code=200)
    return accepted(job_id, job["state"] if job else "queued")  # the state as it is now, e.g. running


def _submit(req: GenerateRequest, settings, store, queue, model) -> str:
    check_generate(req, settings, model)
    request = req.model_dump()
    if request["seed"] is None:  # chosen here so a re-delivered job makes the same images
        request["seed"] = secrets.randbelow(2**31)
    job_id = store.create("generate", request)  # the record first, then the queue
    enqueue_recorded(store, queue, "generate", job_id)
    return job_id


def check_generate(req: GenerateRequest, settings, model) -> None:
    """The configurable caps, the token limit and adapter existence (the model bounds are in the schema)."""
    if req.num_images > settings.max_images:
        raise invalid("num_images", f"at most {settings.max_images}", req.num_images)
    if req.num_inference_steps > settings.max_steps:
        raise invalid("num_inference_steps", f"at most {settings.max_steps}", req.num_inference_steps)
    if req.width is not None and req.width > settings.max_width:
        raise invalid("width", f"at most {settings.max_width}", req.width)
    if req.height is not None and req.height > settings.max_height:
        raise invalid("height", f"at most {settings.max_height}", req.height)
    if req.num_inference_steps < (fewest := model.min_steps(req.scheduler)):
        raise invalid("num_inference_steps", f"the {req.scheduler or 'default'} scheduler of this model needs at "
                      f"least {fewest}", req.num_inference_steps)
    names = [ref.name for ref in req.adapters]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid(f"adapters.{i}.name", f"{name!r} is listed twice; give it once, with the scale you want",
                          name)
    width, height = req.width or model.default_size, req.height or model.default_size
    cost = width * height * req.num_inference_steps * req.num_images
    if cost > settings.max_cost:
        raise invalid("num_inference_steps", f"width × height × num_inference_steps × num_images = {width} × "
                      f"{height} × {req.num_inference_steps} × {req.num_images} = {cost} exceeds the cap of "
                      f"{settings.max_cost}; lower one of them", cost)
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if text:
            n = model.count_tokens(text)
            if n > model.max_prompt_tokens:
                raise invalid(name, f"{n} tokens; the text encoder takes at most {model.max_prompt_tokens}", n)
    volume = Volume(settings.data_dir)
    for i, ref in enumerate(req.adapters):
        if not volume.adapter_exists(ref.name):
            raise not_found(f"adapters.{i}.name: adapter {ref.name!r} not found")
