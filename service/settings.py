"""Settings of the API process and of `minidalle serve` (`MINIDALLE_*`; `.env.example` lists them all)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from jobs.settings import CommonSettings


class ApiSettings(CommonSettings):
    """Read by `uvicorn service.main:app`. The caps bound what one request may cost a GPU."""

    max_width: int = Field(1024, ge=8)
    max_height: int = Field(1024, ge=8)
    max_images: int = Field(8, ge=1)  # images per /generate request
    max_steps: int = Field(150, ge=1)  # denoising steps per /generate request
    # width × height × steps × images: 512² × 50 steps × 4 images is a normal SD 1.5 request; allow 4× that.
    max_cost: int = Field(4 * 512 * 512 * 50 * 4, ge=1)
    max_train_steps: int = Field(20_000, ge=1)
    max_train_resolution: int = Field(1024, ge=8)
    max_train_batch_size: int = Field(64, ge=1)  # images per micro-step a fine-tune may ask for
    max_wait_s: float = Field(120.0, ge=0)  # longest `POST /generate?wait=` a client may ask for
    # uploads (POST /datasets, multipart POST /finetune)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_zip_members: int = Field(10_000, ge=1)
    max_uncompressed_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # above: a decompression bomb, rejected
    sse_ping_s: float = Field(15.0, gt=0)  # keep-alive comment on idle event streams (proxies drop silent ones)


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
