"""Settings only workers read (device, dtype, caches, periodic duties), on top of the shared ones."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator

from jobs.settings import CommonSettings
from minidalle.params import DTYPE_ALIASES


class WorkerSettings(CommonSettings):
    """Read by `celery -A worker.celery_app worker`."""

    device: str | None = None  # None: cuda when available, else cpu
    torch_dtype: str | None = None  # fp16, bf16, fp32 (or float16, ...); None: the library's default for the device
    torch_threads: int = Field(0, ge=0)  # 0: torch's default
    adapter_cache_size: int = Field(8, ge=1)  # resident LoRA adapters per worker (LRU)
    preload: bool = True  # build the pipeline when the worker starts, so /readyz means "can serve now"
    # measure a step at two sizes when the worker starts (the API's cost estimates; also a warm-up)
    calibrate: bool = True
    # A fine-tune on a worker that also serves `generate` hands itself back to its queue (checkpoint first, no attempt
    # counted, resumed exactly) once image requests have waited `yield_after_s`, but at most every
    # `yield_min_interval_s` of training, so it can't be starved either.
    yield_to_generate: bool = True
    yield_after_s: float = Field(2.0, ge=0)
    yield_min_interval_s: float = Field(60.0, ge=0)
    # Dynamic batching of generate jobs (worker.batch): compatible queued jobs (same steps, guidance, size,
    # scheduler, adapters) run as one denoising loop of at most `batch_max_images` images (1: never batch; on CUDA
    # also what free memory allows), after waiting at most `batch_wait_ms` for more to arrive (0: never wait).
    batch_max_images: int = Field(8, ge=1, le=256)
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    batch_memory_fraction: float = Field(0.8, gt=0, le=1)  # of free GPU memory a batch may take
    # The fast path (MiniDallePipeline.enable_fast_path): None = on when the device is CUDA, off on a CPU (where the
    # images then match stock diffusers bit for bit). compile_unet: torch.compile the UNet for requests without
    # adapters (the worker's calibration at start is the warm-up that compiles it).
    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    vae_slicing: bool | None = None
    vae_tiling: bool | None = None
    compile_unet: bool = False
    compile_mode: str = "max-autotune-no-cudagraphs"
    reconcile_interval_s: float = Field(10.0, gt=0)
    # The data volume's janitor (worker.janitor): one worker sweeps this often; an unused dataset stays this long
    # (0: forever). Job folders go when their record has expired (job_ttl_s).
    janitor_interval_s: float = Field(3600.0, gt=0)
    dataset_ttl_s: int = Field(7 * 24 * 3600, ge=0)

    @field_validator("torch_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:  # at start-up, not at the first job
        if v is not None and v not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPE_ALIASES)}")
        return v


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
