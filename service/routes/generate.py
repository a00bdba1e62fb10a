"""POST /generate."""

from __future__ import annotations

import logging
import secrets

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from jobs.keys import Principal
from jobs.store import TERMINAL
from minidalle.params import Generate
from service.access import adapter_of
from service.admission import admit, check_time_limit, cost_model, precheck
from service.deps import HubDep, ModelInfoDep, PrincipalDep, QueueDep, SettingsDep, StoreDep, VolumeDep
from service.errors import STORE_DOWN, invalid
from service.schemas import GenerateRequest, JobAccepted
from service.views import accepted, wait_for_end

log = logging.getLogger(__name__)
router = APIRouter(tags=["generate"])


@router.post("/generate", status_code=202, response_model=JobAccepted,
             responses={200: {"model": JobAccepted, "description": "Finished within `wait` seconds."},
                        404: {"description": "An adapter named in `adapters` does not exist."},
                        422: {"description": "Invalid field (the message names it)."},
                        429: {"description": "The queue or this key's limits are full; see Retry-After."}})
async def generate(request: Request, req: GenerateRequest, settings: SettingsDep, store: StoreDep, queue: QueueDep,
                   hub: HubDep, model: ModelInfoDep, principal: PrincipalDep, volume: VolumeDep,
                   wait: float = Query(0, ge=0, description="Seconds to wait for the images before answering 202.")):
    """Queue a text-to-image job; 202 with its links, or 200 with the finished job when it ends within `wait`."""
    if wait > settings.max_wait_s:
        raise invalid("wait", f"at most {settings.max_wait_s} seconds", wait, where="query")
    await precheck(hub.pool, settings, "generate")
    async with request.app.state.submit_slots:  # a few at a time: a flood queues here, not in 40 busy threads
        # tokenizer and blocking I/O: a thread
        job_id = await run_in_threadpool(_submit, req, settings, store, queue, model, principal, volume)
    return await answer(hub, job_id, wait, principal)


async def answer(hub, job_id: str, wait: float, principal: Principal):
    """202 with the job's links, or 200 with the finished job when it ends within `wait` seconds."""
    # the wait holds no thread: a thousand waiting clients must not starve the threadpool the other routes use
    try:
        job = await wait_for_end(hub, job_id, wait, principal.id) if wait else None
    except STORE_DOWN:  # the job exists: say so (202), a retry would make a second one
        log.warning("job %s: waiting for it failed; answering 202", job_id, exc_info=True)
        job = None
    if job is not None and job["state"] in TERMINAL:
        return JSONResponse(accepted(job_id, job["state"], job), status_code=200)
    return accepted(job_id, job["state"] if job else "queued")  # the state as it is now, e.g. running


def _submit(req: GenerateRequest, settings, store, queue, model, principal: Principal, volume) -> str:
    estimate = check_generate(req, settings, model, store)
    for i, ref in enumerate(req.adapters):
        adapter_of(volume, principal, ref.name, field=f"adapters.{i}.name")  # 404 unless this key may use it
    for ref in req.prompt_adapters():  # <lora:name:weight> in the prompt
        adapter_of(volume, principal, ref.name, field="prompt")
    check_webhook(req.webhook_url, settings)
    request = req.model_dump()
    if request["seed"] is None:  # chosen here so a re-delivered job makes the same images
        request["seed"] = secrets.randbelow(2**31)
    return admit(store, queue, settings, principal, "generate", request, estimate_s=estimate,
                 batch_key=req.batch_key())


def check_webhook(url: str | None, settings) -> None:
    if url is not None:
        from jobs.webhooks import check_url

        check_url(url, settings.webhook_allow)


def max_side(setting: int | None, model) -> int:
    """The operator's cap, else twice the model's native side (4× its pixels: what such a model still draws)."""
    return setting if setting is not None else 2 * model.default_size


def check_generate(req: GenerateRequest, settings, model, store) -> float:
    """The configurable caps, the token limit and the cost (the model bounds are in the schema); the estimate."""
    if req.num_images > settings.max_images:
        raise invalid("num_images", f"at most {settings.max_images}", req.num_images)
    if req.num_inference_steps > settings.max_steps:
        raise invalid("num_inference_steps", f"at most {settings.max_steps}", req.num_inference_steps)
    for name, value, cap in (("width", req.width, max_side(settings.max_width, model)),
                             ("height", req.height, max_side(settings.max_height, model))):
        if value is not None and value > cap:
            raise invalid(name, f"at most {cap} for this model", value)
    if req.num_inference_steps < (fewest := model.min_steps(req.scheduler)):
        raise invalid("num_inference_steps", f"the {req.scheduler or 'default'} scheduler of this model needs at "
                      f"least {fewest}", req.num_inference_steps)
    if req.prior == "diffusion" and not (model.has_diffusion_prior and model.has_ip_adapter):
        raise invalid("prior", "this model has no diffusion prior (diffusion_prior/ and ip_adapter/); use 'mlp'",
                      req.prior)
    names = [ref.name for ref in req.adapters]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid(f"adapters.{i}.name", f"{name!r} is listed twice; give it once, with the scale you want",
                          name)
    tagged = [ref.name for ref in req.prompt_adapters()]
    for name in tagged:
        if name in names:
            raise invalid("prompt", f"<lora:{name}> names an adapter that `adapters` lists too; give it once", name)
    if len(names) + len(tagged) > Generate.max_adapters:
        raise invalid("prompt", f"{len(names) + len(tagged)} adapters with the <lora:…> tags; at most "
                      f"{Generate.max_adapters} at once", len(names) + len(tagged))
    width, height = req.width or model.default_size, req.height or model.default_size
    estimate = cost_model(store, settings, model).generate_s(
        width=width, height=height, steps=req.num_inference_steps, images=req.num_images,
        guidance_scale=req.guidance_scale)
    check_time_limit("generate", estimate, settings, "num_inference_steps",
                     "lower num_inference_steps, num_images, width or height")
    for name, text in (("prompt", req.prompt_text()), ("negative_prompt", req.negative_prompt)):
        if text:
            n = model.count_tokens(text)
            if n > model.max_prompt_tokens:
                raise invalid(name, f"{n} tokens; the text encoder takes at most {model.max_prompt_tokens}", n)
    return estimate
