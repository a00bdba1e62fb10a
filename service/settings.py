"""Settings of the API process and of `minidalle serve` (`MINIDALLE_*`; `.env.example` lists them all)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from jobs.settings import CommonSettings


class ApiSettings(CommonSettings):
    """Read by `uvicorn service.main:app`. The caps bound what one request may cost a worker."""

    # None: twice the model's native side (an SD 1.5 model: 1024; the embedded 32 px model: 64)
    max_width: int | None = Field(None, ge=8)
    max_height: int | None = Field(None, ge=8)
    max_images: int = Field(8, ge=1)  # images per /generate request
    max_steps: int = Field(150, ge=1)  # denoising steps per /generate request
    max_train_steps: int = Field(20_000, ge=1)
    max_train_resolution: int = Field(1024, ge=8)
    max_train_batch_size: int = Field(64, ge=1)  # images per micro-step a fine-tune may ask for
    max_wait_s: float = Field(120.0, ge=0)  # longest `POST /generate?wait=` a client may ask for
    # The cost model (jobs.cost) assumes this many seconds for one step of one image at the model's native size
    # until a worker has measured the real figure (workers measure at start-up and after every job).
    default_step_s: float = Field(0.5, gt=0)
    # Bounded queues: beyond these, 429 with Retry-After (the queue's estimated drain time).
    max_queued_generate: int = Field(1000, ge=1)
    max_queued_generate_s: float = Field(3600.0, gt=0)
    max_queued_finetune: int = Field(100, ge=1)
    max_queued_finetune_s: float = Field(7 * 24 * 3600.0, gt=0)
    # Per API key (a key's own limits, set with `minidalle keys create`, override these)
    key_requests_per_minute: int = Field(600, ge=1)
    key_concurrent_jobs: int = Field(64, ge=1)  # queued + running
    key_queued_seconds: float = Field(4 * 3600.0, gt=0)  # estimated seconds of its queued + running jobs
    key_disk_bytes: int = Field(20 * 1024**3, ge=0)  # datasets + adapters it owns
    key_event_streams: int = Field(100, ge=1)  # open SSE streams and `?wait=` requests at once
    # uploads (POST /datasets, multipart POST /finetune)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_zip_members: int = Field(10_000, ge=1)
    max_uncompressed_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # one image; above: a decompression bomb, rejected
    max_upload_pixels: int = Field(2_000 * 1024 * 1024, ge=1)  # all images of one upload together
    sse_ping_s: float = Field(15.0, gt=0)  # keep-alive comment on idle event streams (proxies drop silent ones)
    # Browser origins allowed to call the API (comma-separated; "*" for any); empty: no CORS headers at all.
    cors_origins: str = ""


class ServeSettings(ApiSettings):
    """Read by `minidalle serve` (command-line options override these)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)  # worker processes; each serves both queues and loads its own pipeline
    queues: str = "generate,finetune"
    log_level: str = "info"


@lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
