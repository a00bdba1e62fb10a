"""The A1111 API (stable-diffusion-webui's `/sdapi/v1/*`), so its clients (webuiapi, Open WebUI, SillyTavern, editor
plugins) work unchanged. A thin translation: `txt2img` becomes the same `generate` job as `POST /generate` (the same
admission, queue, caps, keys and ownership; no second execution path) and waits for it, as A1111 answers when the
images exist. A1111's names are `minidalle.a1111`'s (samplers, schedule types, `<lora:name:weight>`, infotexts).

What A1111 offers and this service does not (hires fix, face restoration, tiling, scripts, styles, variation
seeds) is a 422 naming the field when asked for, never silently ignored; the other fields clients always send with
their defaults (`eta`, `s_churn`, `do_not_save_grid`, …) are accepted and have no effect.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.keys import Principal
from jobs.store import decode_job, job_key
from jobs.volume import adapter_links
from minidalle import __version__
from minidalle.a1111 import SAMPLERS, SCHEDULE_LABELS, parse_infotext, sampler_from_a1111
from minidalle.errors import InvalidInput
from service.access import readable_adapters
from service.admission import precheck
from service.deps import HubDep, ModelInfoDep, PrincipalDep, QueueDep, SettingsDep, StoreDep, VolumeDep
from service.errors import invalid
from service.routes.generate import _submit
from service.routes.jobs import cancel_job
from service.schemas import GenerateRequest
from service.views import wait_for_end

router = APIRouter(prefix="/sdapi/v1", tags=["A1111 API"])

# our request's field -> the A1111 field a client sent it as (errors name the client's field)
A1111_FIELD = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images": "batch_size",
               "scheduler": "sampler_name"}
# A1111 features this service does not have: asked for (truthy), they are refused by name
UNSUPPORTED = {"enable_hr": "hires fix", "restore_faces": "face restoration", "tiling": "tiling",
               "script_name": "scripts", "alwayson_scripts": "always-on scripts (ControlNet, ADetailer, …)",
               "styles": "prompt styles", "subseed_strength": "variation seeds", "refiner_checkpoint": "a refiner",
               "init_images": "img2img (POST /sdapi/v1/txt2img makes images from text)"}
MAX_PNG_INFO_BYTES = 700_000  # decoded image bytes of POST /png-info (the JSON body is capped at 1 MiB)


class Txt2ImgRequest(BaseModel):
    """A1111's `StableDiffusionTxt2ImgProcessingAPI`: the fields that mean something here; every other field
    clients send is accepted (see the module's doc)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "seed": -1,
         "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 1, "n_iter": 1, "steps": 20,
         "cfg_scale": 7, "width": 32, "height": 32}]})

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random; image i uses seed + i")
    sampler_name: str | None = Field(None, description="A1111's name (`Euler a`, `DPM++ 2M`, …: GET /samplers) or "
                                                        "ours; empty: the model's own")
    sampler_index: str | None = Field(None, description="The older name of `sampler_name`.")
    scheduler: str | None = Field(None, description="Schedule type (`Automatic`, `Karras`, …: GET /schedulers)")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    override_settings: dict[str, Any] | None = None
    send_images: bool = True


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs, each with its `parameters` infotext.")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seeds, prompts and each image's infotext, as A1111 writes it.")


def _a1111_errors(errors, prefix: tuple = ("body",)) -> RequestValidationError:
    """Our field names in `errors` replaced by the A1111 names the client used."""
    out = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        if loc and loc[0] in A1111_FIELD:
            msg = str(e.get("msg", "")).replace(f"{loc[0]}:", f"{A1111_FIELD[loc[0]]}:", 1)
            loc = [A1111_FIELD[loc[0]], *loc[1:]]
            e = {**e, "msg": msg}
        out.append({**e, "loc": (*prefix, *loc)})
    return RequestValidationError(out)


def _check_model(name: Any, model_name: str, field: str) -> None:
    if name and str(name) != model_name:
        raise invalid(field, f"this service serves one model, {model_name!r}; got {str(name)[:100]!r}")


def to_generate(body: Txt2ImgRequest, model_name: str) -> GenerateRequest:
    """The native request the A1111 body asks for (or a 422 naming the A1111 field)."""
    extra = body.model_extra or {}
    for name, what in UNSUPPORTED.items():
        if extra.get(name):
            raise invalid(name, f"{what} is not offered by this service", extra[name])
    overrides = body.override_settings or {}
    _check_model(overrides.get("sd_model_checkpoint"), model_name, "override_settings.sd_model_checkpoint")
    try:
        scheduler = sampler_from_a1111(body.sampler_name or body.sampler_index, body.scheduler,
                                       field="sampler_name" if body.sampler_name else "sampler_index")
    except InvalidInput as e:
        raise invalid(e.field, e.message, getattr(body, e.field, None)) from None
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or None,
              "num_images": body.batch_size * body.n_iter, "num_inference_steps": body.steps,
              "guidance_scale": body.cfg_scale, "seed": None if body.seed == -1 else body.seed,
              "width": body.width, "height": body.height, "scheduler": scheduler}
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as e:
        raise _a1111_errors(e.errors(include_url=False)) from None


@router.post("/txt2img", response_model=Txt2ImgResponse,
             responses={404: {"description": "A `<lora:name>` in the prompt names no adapter this key may use."},
                        422: {"description": "Invalid field (the message names the A1111 field)."},
                        429: {"description": "The queue or this key's limits are full; see Retry-After."},
                        504: {"description": "Not done within the generate time limit; follow the job's links."}})
async def txt2img(request: Request, body: Txt2ImgRequest, settings: SettingsDep, store: StoreDep, queue: QueueDep,
                  hub: HubDep, model: ModelInfoDep, principal: PrincipalDep, volume: VolumeDep):
    """Text to image, answered when the images exist: a `generate` job (the same queue, limits and ownership as
    `POST /generate`), its PNGs in base64 and A1111's `info`."""
    req = to_generate(body, settings.model_name)
    await precheck(hub.pool, settings, "generate")
    async with request.app.state.submit_slots:
        try:
            job_id = await run_in_threadpool(_submit, req, settings, store, queue, model, principal, volume)
        except RequestValidationError as e:
            raise _a1111_errors(e.errors()) from None
    timeout = settings.time_limit_s("generate") + settings.max_wait_s  # its time limit, and some to wait in line
    job = await wait_for_end(hub, job_id, timeout, principal.id)
    if job is None or job["state"] in ("queued", "running"):
        raise HTTPException(504, f"job {job_id} is not done yet; follow /jobs/{job_id}")
    if job["state"] == "failed":
        raise HTTPException(500, f"job {job_id} failed: {job.get('error') or 'unknown error'}")
    images, infotexts = await run_in_threadpool(_pngs, volume, job) if job["state"] == "succeeded" else ([], [])
    seeds = [img.get("seed") for img in (job.get("result") or {}).get("images", [])]
    first_seed = seeds[0] if seeds else job["request"].get("seed")
    sampler = body.sampler_name or body.sampler_index or ""
    info = {"prompt": body.prompt, "all_prompts": [body.prompt] * len(seeds), "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * len(seeds), "seed": first_seed, "all_seeds": seeds,
            "subseed": first_seed, "all_subseeds": seeds, "subseed_strength": 0, "width": req.width,
            "height": req.height, "sampler_name": sampler, "scheduler": body.scheduler or "Automatic",
            "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size, "n_iter": body.n_iter,
            "restore_faces": False, "sd_model_name": settings.model_name, "sd_model_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job["created_at"])), "clip_skip": 1,
            "version": f"minidalle {__version__}", "job_id": job_id, "state": job["state"]}
    parameters = {**body.model_dump(), "seed": first_seed}
    return {"images": images if body.send_images else [], "parameters": parameters, "info": json.dumps(info)}


def _pngs(volume, job: dict) -> tuple[list[str], list[str]]:
    images, infotexts = [], []
    for img in (job.get("result") or {}).get("images", []):
        data = volume.image(job["id"], img["index"]).read_bytes()
        images.append(base64.b64encode(data).decode())
        with Image.open(io.BytesIO(data)) as im:
            infotexts.append(im.info.get("parameters", ""))
    return images, infotexts


@router.get("/options")
def get_options(settings: SettingsDep, principal: PrincipalDep) -> dict:
    """The settings A1111 clients read: the model (this service serves one)."""
    return {"sd_model_checkpoint": settings.model_name, "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "eta_noise_seed_delta": 0}


@router.post("/options", responses={422: {"description": "A model this service does not serve."}})
def set_options(options: dict[str, Any], settings: SettingsDep, principal: PrincipalDep) -> None:
    """Accepts `sd_model_checkpoint` naming the served model (a client's "switch model" to it); other options are
    accepted and change nothing (generation parameters travel with each request)."""
    _check_model(options.get("sd_model_checkpoint"), settings.model_name, "sd_model_checkpoint")
    return None


@router.get("/sd-models")
def sd_models(settings: SettingsDep, principal: PrincipalDep) -> list[dict]:
    name = settings.model_name
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name,
             "config": None}]


@router.get("/samplers")
def samplers(principal: PrincipalDep) -> list[dict]:
    """A1111's sampler names that map to this service's samplers (`options.scheduler`: the schedule Automatic
    means for it)."""
    out = []
    for s in SAMPLERS:
        automatic = s.schedules["automatic"]
        default = next((k for k, v in s.schedules.items() if v == automatic and k != "automatic"), None)
        out.append({"name": s.label, "aliases": list(s.aliases), "options": {"scheduler": default} if default else {}})
    return out


@router.get("/schedulers")
def schedulers(principal: PrincipalDep) -> list[dict]:
    """The schedule types some sampler here runs with."""
    used = {k for s in SAMPLERS for k in s.schedules}
    return [{"name": k, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for k, label in SCHEDULE_LABELS.items() if k in used]


@router.get("/loras")
def loras(volume: VolumeDep, principal: PrincipalDep) -> list[dict]:
    """The adapters this key may use, by the name `<lora:name:weight>` takes (`path`: its kohya file's URL)."""
    return [{"name": name, "alias": name, "path": adapter_links(name)["download_url"] + "?file=kohya_lora.safetensors",
             "metadata": {"base_model": meta.get("base_model"), "steps": meta.get("steps"),
                          "visibility": access["visibility"]}}
            for name, meta, access in readable_adapters(volume, principal)]


@router.post("/refresh-loras")
def refresh_loras(principal: PrincipalDep) -> None:
    """Nothing to do: adapters are read from the data volume on every request."""
    return None


@router.post("/refresh-checkpoints")
def refresh_checkpoints(principal: PrincipalDep) -> None:
    return None


@router.get("/scripts")
def scripts(principal: PrincipalDep) -> dict:
    return {"txt2img": [], "img2img": []}


@router.get("/upscalers")
def upscalers(principal: PrincipalDep) -> list[dict]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]


@router.get("/sd-vae")
def sd_vae(principal: PrincipalDep) -> list[dict]:
    return []


@router.get("/embeddings")
def embeddings(principal: PrincipalDep) -> dict:
    return {"loaded": {}, "skipped": {}}


@router.get("/prompt-styles")
def prompt_styles(principal: PrincipalDep) -> list[dict]:
    return []


def _live_generate_jobs(store, principal: Principal) -> list[dict]:
    """This key's queued and running generate jobs (every key's, for an admin), oldest first."""
    ids = store.active_ids()
    p = store.r.pipeline(transaction=False)
    for job_id in ids:
        p.hgetall(job_key(job_id))
    jobs = [decode_job(raw) for raw in p.execute() if raw]
    mine = [j for j in jobs if j["kind"] == "generate" and j["state"] in ("queued", "running")
            and principal.owns(j["owner"])]
    return sorted(mine, key=lambda j: j["created_at"])


@router.get("/progress")
def progress(store: StoreDep, principal: PrincipalDep) -> dict:
    """The progress of this key's running image job (A1111 runs one at a time; here several may run)."""
    jobs = _live_generate_jobs(store, principal)
    running = [j for j in jobs if j["state"] == "running"]
    current = running[0] if running else None
    prog = (current or {}).get("progress") or {}
    step, total = int(prog.get("step") or 0), int(prog.get("total") or 0)
    eta = prog.get("eta_s")
    return {"progress": step / total if total else 0.0, "eta_relative": float(eta) if eta is not None else 0.0,
            "state": {"skipped": False, "interrupted": bool(current and current.get("cancel_requested")),
                      "stopping_generation": False, "job": current["id"] if current else "",
                      "job_count": len(jobs), "job_timestamp": time.strftime(
                          "%Y%m%d%H%M%S", time.gmtime(current["created_at"])) if current else "0",
                      "job_no": 0, "sampling_step": step, "sampling_steps": total},
            "current_image": None, "textinfo": None, "current_task": current["id"] if current else None}


@router.post("/interrupt")
def interrupt(store: StoreDep, queue: QueueDep, principal: PrincipalDep) -> dict:
    """Stop this key's running image jobs (as A1111's Interrupt stops the current one; queued ones stay)."""
    for job in _live_generate_jobs(store, principal):
        if job["state"] == "running":
            try:
                cancel_job(job["id"], store, queue, principal)
            except HTTPException:  # it ended meanwhile
                pass
    return {}


@router.post("/skip")
def skip(store: StoreDep, queue: QueueDep, principal: PrincipalDep) -> dict:
    return interrupt(store, queue, principal)


class PngInfoRequest(BaseModel):
    image: str = Field(description="The image in base64 (a `data:image/png;base64,` prefix is accepted).")


@router.post("/png-info", responses={422: {"description": "`image` is not a base64 image."}})
def png_info(body: PngInfoRequest, principal: PrincipalDep) -> dict:
    """An image's generation parameters: its `parameters` text (`info`), parsed (`parameters`), and its other text
    chunks (`items`). Only the image's header is read; its pixels are never decoded."""
    text = body.image.split(",", 1)[1] if body.image.startswith("data:") else body.image
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image", "is not base64") from None
    if len(data) > MAX_PNG_INFO_BYTES:
        raise invalid("image", f"{len(data)} bytes; at most {MAX_PNG_INFO_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            items = {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise invalid("image", "is not an image this service can read") from None
    info = items.pop("parameters", "")
    return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}
