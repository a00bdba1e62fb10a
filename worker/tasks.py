"""The Celery tasks: thin. The argument is the job id; the request is in the job record; the work is the library's.

`worker.run.run_job` owns the run (claim, events, checks, final state); these bodies turn the request into library
calls (`jobs.requests`: the one place API fields become library arguments) and put the outputs on the data volume
(`jobs.volume`). A fine-tune re-delivered after a worker died resumes from its last checkpoint. Adapters (a
fine-tune's, an import's) are written under the job's folder and renamed into `adapters/{name}` with their owner.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

from jobs import cost, volume
from jobs.queue import FINETUNE_TASK, GENERATE_TASK, IMPORT_TASK
from jobs.requests import FinetuneRequest, ImportRequest, generate_request
from minidalle import Cancelled
from minidalle.errors import InvalidInput
from worker.batch import Batch, run_batch
from worker.celery_app import app
from worker.run import JobRun, Stop, run_job
from worker.runtime import activate_adapter, get_pipeline, max_batch_images
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)


@app.task(name=GENERATE_TASK)
def generate(job_id: str) -> None:
    run_batch(job_id, _generate)


@app.task(name=FINETUNE_TASK)
def finetune(job_id: str) -> None:
    if run_job(job_id, _finetune) == "yield":
        serve_waiting_images()


@app.task(name=IMPORT_TASK)
def adapter_import(job_id: str) -> None:
    run_job(job_id, _import)


def serve_waiting_images() -> int:
    """A fine-tune just yielded (it is back in its queue): make the images that wait, here and now, oldest first
    (batched as usual), before this worker takes its next message, whichever queue the broker hands it from. At
    most `yield_min_interval_s` of it, so the fine-tune is not starved either. Returns the batches run."""
    from worker import lifecycle

    settings, store = get_worker_settings(), lifecycle.get_store()
    deadline, tried, batches = time.monotonic() + settings.yield_min_interval_s, [], 0
    while time.monotonic() < deadline and not lifecycle.shutting_down():
        job_id = store.oldest_batchable(skip=tried)
        if job_id is None:
            break
        tried.append(job_id)  # taken by another worker meanwhile: not tried again
        run_batch(job_id, _generate)
        batches += 1
    return batches


def _generate(batch: Batch) -> None:
    """The delivered job, with the compatible ones that wait (worker.batch), in one `generate_many` call."""
    settings, vol = batch.settings, volume.Volume(batch.settings.data_dir)
    pipe = get_pipeline(settings)
    first = generate_request(batch.runs[0].job["request"])
    batch.gather(max_batch_images(pipe, settings, first.width or pipe.default_width,
                                  first.height or pipe.default_height))
    members = []
    for run in list(batch.runs):  # a job whose input is bad fails alone, before any model work
        try:
            req = generate_request(run.job["request"])
            kwargs = req.pipeline_kwargs()
            kwargs["adapters"] = [(activate_adapter(pipe, vol, name), scale) for name, scale in kwargs["adapters"]]
            if req.image_id is not None:  # a variation: its image, as the API re-encoded it
                kwargs["image"] = _variation_image(vol, req.image_id)
            pipe.check_inputs(**kwargs)
        except Exception as e:  # noqa: BLE001 - this job's final state (conclude logs the unexpected)
            batch.drop(run, e)
            continue
        members.append((run, kwargs))
    _run_together(batch, pipe, vol, members)


def _variation_image(vol: volume.Volume, image_id: str):
    from PIL import Image

    path = vol.upload_image(image_id)
    if not path.is_file():
        raise InvalidInput("file", "the uploaded image is gone (the job outlived it); send it again")
    with Image.open(path) as im:
        return im.convert("RGB")


def _run_together(batch: Batch, pipe, vol: volume.Volume, members: list[tuple[JobRun, dict]]) -> None:
    from minidalle.pipeline import BATCH_SHARED
    from minidalle.png import save_png

    if not members:
        return
    shared = {k: v for k, v in members[0][1].items() if k in BATCH_SHARED}
    requests = [{k: v for k, v in kwargs.items() if k not in BATCH_SHARED} for _, kwargs in members]
    total = sum(kwargs["num_images_per_prompt"] for _, kwargs in members)
    for run, kwargs in members:
        run.share = kwargs["num_images_per_prompt"] / total

    def on_step(step: int, steps: int) -> None:
        for run, _ in members:
            if batch.alive(run):
                took = run.step_done()
                try:
                    run.publish({"step": step, "total": steps, "eta_s": round(took * (steps - step), 3)})
                except Stop as e:  # this job stops; the batch goes on without it
                    batch.drop(run, e)
        if not any(batch.alive(run) for run, _ in members):
            raise Cancelled("every job of the batch stopped")

    t0 = time.perf_counter()
    try:
        outs = pipe.generate_many(requests, callback=on_step, **shared)
    except Cancelled:
        if any(batch.alive(run) for run, _ in members):
            raise
        return
    except Exception:
        left = [m for m in members if batch.alive(m[0])]
        if len(left) < 2:
            raise
        # not a job's input (each was checked): run each alone, so whatever it is fails only the job it belongs to
        log.warning("a batch of %d jobs failed; running them one by one", len(left), exc_info=True)
        for member in left:
            _run_together(batch, pipe, vol, [member])
        return
    log.info("jobs %s: pipeline %.3f s for %d images", ",".join(r.id for r, _ in members), time.perf_counter() - t0,
             total)
    alive = [(run, out) for (run, _), out in zip(members, outs, strict=True) if batch.alive(run)]
    if alive:
        meta0 = alive[0][1].metadata[0]
        _learn_cost(alive[0][0], "generate", pipe, width=meta0["width"], height=meta0["height"],
                    batch=total * (2 if shared["guidance_scale"] > 1 else 1))
    for run, out in alive:
        try:
            run.images = len(out.images)
            images = []
            for i, (image, meta) in enumerate(zip(out.images, out.metadata, strict=True)):
                save_png(image, vol.image(run.id, i), meta)  # temp file + rename
                url = volume.image_url(run.id, i)
                images.append({"index": i, "url": url, "seed": meta.get("seed"), "metadata": meta})
                run.emit({"index": i, "url": url, "seed": meta.get("seed")}, event="image")
        except Exception as e:  # noqa: BLE001 - this job fails alone (conclude logs it)
            batch.drop(run, e)
            continue
        batch.finish(run, {"images": images, "batch": {"jobs": len(members), "images": total}})


def _finetune(run: JobRun) -> dict:
    from minidalle.training import TrainConfig, train

    settings, vol = run.settings, volume.Volume(run.settings.data_dir)
    req = FinetuneRequest.model_validate(run.job["request"])
    if req.dataset_id is None or not vol.dataset_exists(req.dataset_id):
        raise InvalidInput("dataset_id", f"dataset {req.dataset_id!r} not found")
    dataset_dir = vol.dataset(req.dataset_id)
    volume.mark_used(dataset_dir)
    job_dir = vol.job(run.id)
    out_dir = vol.unpublished_adapter(run.id)  # written by the trainer, renamed into adapters/{name} at the end
    final = vol.adapter(req.name)
    result = {"adapter": volume.adapter_links(req.name)}
    marker = job_dir / "published"  # written just before the rename: "this job's adapter is (being) published"
    if marker.is_file():  # a re-delivery after this job published, or died between marker and rename
        if out_dir.is_dir() and not final.exists():
            os.rename(out_dir, final)
        shutil.rmtree(vol.checkpoints(run.id), ignore_errors=True)
        return result
    if not _finished_adapter(out_dir, req.steps):
        config = TrainConfig(dataset_dir=str(dataset_dir), output_dir=str(out_dir), work_dir=str(job_dir),
                             model=settings.model or None, resume=True, **req.train_kwargs())
        pipe = get_pipeline(settings)
        try:
            result_t = train(config, on_progress=lambda event: _train_event(run, vol.validation(run.id), event),
                             pipeline=pipe)
        except InvalidInput as e:
            if e.field != "dataset_dir":
                raise
            # the client named a dataset id, not a folder: say it in its terms, with no server path
            message = e.message.replace(str(dataset_dir) + "/", "").replace(str(dataset_dir), "the dataset")
            raise InvalidInput("dataset_id", message) from e
        size = result_t.resolution
        _learn_cost(run, "finetune", pipe, width=size, height=size, batch=req.batch_size * req.grad_accum)
    _publish(run, vol, out_dir, req.name, "this job's adapter is kept until the job expires")
    shutil.rmtree(vol.checkpoints(run.id), ignore_errors=True)  # published: nothing left to resume
    return result


def _publish(run: JobRun, vol: volume.Volume, out_dir: Path, name: str, kept: str) -> None:
    """Rename a finished adapter folder into adapters/{name}, owned by the job's key; never over another."""
    final = vol.adapter(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise InvalidInput("name", f"adapter {name!r} already exists; {kept}")
    volume.write_access(out_dir, owner=run.job["owner"], visibility="private")  # published with its owner
    (vol.job(run.id) / "published").write_text(name)  # "this job's adapter is (being) published"
    os.rename(out_dir, final)


def _import(run: JobRun) -> dict:
    """A LoRA file made elsewhere (kohya / A1111, diffusers, peft) checked against the resident base model and
    published as adapter `name`; a refused file is the job's error (naming `file`) and nothing is stored. The
    upload is removed either way, before the job's final state is written (so a client that saw it end finds
    nothing left behind; `lifecycle.release_resources` removes it too, for a job that ends without running)."""
    vol = volume.Volume(run.settings.data_dir)
    req = ImportRequest.model_validate(run.job["request"])
    try:
        return _import_upload(run, vol, req)
    finally:
        shutil.rmtree(vol.upload(req.upload_id), ignore_errors=True)


def _import_upload(run: JobRun, vol: volume.Volume, req: ImportRequest) -> dict:
    from minidalle.lora_formats import import_adapter

    out_dir, final = vol.unpublished_adapter(run.id), vol.adapter(req.name)
    result = {"adapter": volume.adapter_links(req.name)}
    if (vol.job(run.id) / "published").is_file():  # a re-delivery after this job published (or died renaming)
        if out_dir.is_dir() and not final.exists():
            os.rename(out_dir, final)
        return result
    src = vol.upload_file(req.upload_id)
    if not src.is_file():
        raise InvalidInput("file", "the uploaded file is gone (its import was already run); upload it again")
    shutil.rmtree(out_dir, ignore_errors=True)  # what a worker that died half-way through wrote
    vol.job(run.id).mkdir(parents=True, exist_ok=True)
    try:
        import_adapter(src, out_dir, pipeline=get_pipeline(run.settings), name=req.name)
    except InvalidInput as e:  # the library names our copy (lora.safetensors): say it with the client's name
        shutil.rmtree(out_dir, ignore_errors=True)
        message = e.message.replace(str(src), src.name).replace(src.name, req.filename or "the file")
        raise InvalidInput(e.field, message) from e
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    try:
        _publish(run, vol, out_dir, req.name, "upload the file again under another name")
    except InvalidInput:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return result


def _learn_cost(run: JobRun, kind: str, pipe, *, width: int, height: int, batch: float) -> None:
    """Tell the cost model (jobs.cost) what a step of this size and batch took here."""
    if len(run.step_seconds) < 2:
        return
    step_s = statistics.median(run.step_seconds[1:])  # the first includes encoding and the scheduler's set-up
    # sent with the run's last events: no round trip of its own before the job ends
    run.extra_commands += cost.record_commands(run.settings.model_name, kind, step_s=step_s, batch=batch,
                                               tokens=cost.tokens(width, height, pipe.vae_scale_factor))


def _finished_adapter(out_dir: Path, steps: int) -> bool:
    try:
        return json.loads((out_dir / volume.ADAPTER_META).read_text()).get("steps") == steps
    except (OSError, ValueError):
        return False


def _train_event(run: JobRun, validation_dir: Path, event: dict) -> None:
    kind = event.get("type")
    if kind == "progress":
        run.step_done()
        data = {k: event.get(k) for k in ("step", "total", "loss", "lr", "eta_s")}
        if "diffusion_prior_loss" in event:  # a model with a diffusion prior: its LoRA trains too
            data["diffusion_prior_loss"] = event["diffusion_prior_loss"]
        run.publish(data)
    elif kind == "checkpoint":
        run.publish({"step": event["step"], "total": event["total"]}, event="checkpoint")
    elif kind == "validation":
        urls = []
        for p in event.get("images", []):
            rel = Path(p).relative_to(validation_dir)
            urls.append(volume.validation_url(run.id, rel.as_posix()))
        run.publish({"step": event["step"], "total": event["total"], "images": urls}, event="validation")
