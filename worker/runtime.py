"""The per-process resident pipeline and adapter activation. Imports torch (through minidalle) lazily."""

from __future__ import annotations

import logging
import threading

from jobs.volume import Volume
from minidalle.errors import InvalidInput
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
_lock = threading.Lock()
_pipe = None
_image_bytes: dict[int, int] = {}  # pixels -> CUDA bytes one image with guidance took (calibrate)


def get_pipeline(settings: WorkerSettings):
    """Build the pipeline once per process (base + prior) and keep it resident."""
    global _pipe
    with _lock:
        if _pipe is None:
            import torch

            from minidalle import MiniDallePipeline

            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            log.info("loading model %s", settings.model or "(embedded default)")
            _pipe = MiniDallePipeline.from_pretrained(settings.model or None, torch_dtype=settings.torch_dtype or None,
                                                      device=settings.device or None,
                                                      max_loaded_adapters=settings.adapter_cache_size,
                                                      model_id=settings.model_name)  # never a server path
            on = _pipe.enable_fast_path(**fast_path(settings, _pipe.device.type))
            log.info("model loaded on %s (%s); fast path: %s", _pipe.device, _pipe.dtype,
                     ", ".join(k for k, v in on.items() if v) or "off")
        return _pipe


def fast_path(settings: WorkerSettings, device_type: str) -> dict:
    """`enable_fast_path` keywords: each switch as set, or (None) on for CUDA."""
    def auto(value: bool | None) -> bool:
        return device_type == "cuda" if value is None else value

    return dict(channels_last=auto(settings.channels_last), fuse_qkv=auto(settings.fuse_qkv),
                vae_slicing=auto(settings.vae_slicing), vae_tiling=auto(settings.vae_tiling),
                compile_unet=settings.compile_unet, compile_mode=settings.compile_mode)


def calibrate(pipe, store, settings: WorkerSettings) -> list[tuple[int, float]]:
    """Measure one denoising step at the model's native size and at twice its side (batch 2: one image with
    guidance), so the API's cost model (jobs.cost) has two sizes to fit before the first request; also warms the
    pipeline up, so the first request is not the slow one. Returns (tokens, seconds per step) pairs."""
    import time

    import torch

    from jobs import cost

    measured = []
    for side in (pipe.default_height, 2 * pipe.default_height):
        stamps: list[float] = []
        cuda = pipe.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pipe.device)
            torch.cuda.reset_peak_memory_stats(pipe.device)
            before = torch.cuda.memory_allocated(pipe.device)
        pipe("calibration", num_inference_steps=3, guidance_scale=7.5, width=side, height=side, seed=0,
             callback=lambda step, total, stamps=stamps: stamps.append(time.perf_counter()))
        if cuda:  # what one image with guidance takes beyond the weights: sizes the batches (max_batch_images)
            _image_bytes[side * side] = torch.cuda.max_memory_allocated(pipe.device) - before
        step_s = min(b - a for a, b in zip(stamps, stamps[1:], strict=False))  # steps 2-3: no encoding, no set-up
        p = cost.tokens(side, side, pipe.vae_scale_factor)
        cost.record(store.r, settings.model_name, "generate", tokens=p, batch=2, step_s=step_s)
        measured.append((p, step_s))
    log.info("calibrated: %s", ", ".join(f"{p} tokens {s * 1000:.1f} ms/step" for p, s in measured))
    return measured


def max_batch_images(pipe, settings: WorkerSettings, width: int, height: int) -> int:
    """Images one denoising loop may hold: the setting, and on CUDA what `batch_memory_fraction` of the free memory
    allows, from what calibration measured per image (scaled by pixels, from the nearest measured size)."""
    limit = settings.batch_max_images
    if pipe.device.type != "cuda" or not _image_bytes or limit <= 1:
        return limit
    import torch

    pixels = width * height
    measured = min(_image_bytes, key=lambda p: abs(p - pixels))
    per_image = max(1, _image_bytes[measured]) * pixels / measured
    free, _ = torch.cuda.mem_get_info(pipe.device)
    return max(1, min(limit, int(free * settings.batch_memory_fraction // per_image)))


def pipeline_loaded() -> bool:
    return _pipe is not None


def activate_adapter(pipe, volume: Volume, name: str) -> str:
    """Make adapter `name` resident (LRU-cached by the pipeline; reloaded only when its files changed)."""
    if not volume.adapter_exists(name):
        raise InvalidInput("adapters", f"adapter {name!r} not found")
    return pipe.load_adapter(volume.adapter(name), name=name)
