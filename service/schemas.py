"""Request and response bodies. Static bounds live here; the configurable caps are checked in the routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.model_info import ADAPTER_NAME_PATTERN, SCHEDULER_NAMES

DATASET_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_SEED = 2**62  # the pipeline seeds image i with seed + i; stay far from int64's edge


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="An adapter listed by GET /adapters.")
    scale: float = Field(1.0, ge=-10, le=10, description="LoRA strength; 0 disables, 1 is as trained.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "num_images": 2,
                 "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 42, "scheduler": "dpmpp_2m",
                 "adapters": [{"name": "my-style", "scale": 0.8}]}
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    num_images: int = Field(1, ge=1, le=64)
    num_inference_steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0, le=50)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, strict=True,
                             description="Image i uses seed + i; random when omitted.")
    width: int | None = Field(None, ge=8, le=8192, multiple_of=8, description="Default: the model's native size.")
    height: int | None = Field(None, ge=8, le=8192, multiple_of=8, description="Default: the model's native size.")
    scheduler: str | None = Field(None, description="One of: " + ", ".join(SCHEDULER_NAMES) + ".")
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=8)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str | None) -> str | None:
        if v is not None and v not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {v!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        return v


class FinetuneRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"name": "my-style", "dataset_id": "0f8b5c2e9d7a4b1c8e3f6a5d4c3b2a19", "steps": 500,
                 "learning_rate": 1e-4, "rank": 8, "alpha": 16, "validation_prompts": ["a red circle"],
                 "checkpoint_every": 100}
            ]
        },
    )

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="Name of the adapter this job publishes.")
    dataset_id: str | None = Field(None, pattern=DATASET_ID_PATTERN, description="From POST /datasets.")
    steps: int = Field(500, ge=1, le=1_000_000)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    rank: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0, le=4096)
    dropout: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(1, ge=1, le=64)
    grad_accum: int = Field(1, ge=1, le=1024)
    resolution: int | None = Field(None, ge=8, le=8192, multiple_of=8, description="Default: the model's size.")
    train_prior: bool = True
    validation_prompts: list[str] = Field(default_factory=list, max_length=8)
    checkpoint_every: int | None = Field(None, ge=1, description="Default: about ten checkpoints per run.")
    seed: int = Field(0, ge=0, lt=MAX_SEED)


class JobAccepted(BaseModel):
    job_id: str
    state: str
    status_url: str
    events_url: str
    cancel_url: str
    job: Job | None = Field(None, description="The finished job, when the request waited (`?wait=`) for it.")


class Progress(BaseModel):
    step: int
    total: int
    eta_s: float | None = None
    loss: float | None = None


class Job(BaseModel):
    id: str
    kind: Literal["generate", "finetune"]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    progress: Progress | None = None
    request: dict[str, Any]
    result: dict[str, Any] | None = Field(None, description="generate: images (url, seed, metadata); "
                                                             "finetune: adapter (name, url, download_url).")
    error: str | None = None
    links: dict[str, str]


class JobList(BaseModel):
    jobs: list[Job]


class CancelResult(BaseModel):
    job_id: str
    state: str
    detail: str


class DatasetInfo(BaseModel):
    dataset_id: str
    images: int
    warnings: list[str]


class AdapterSummary(BaseModel):
    name: str
    url: str
    download_url: str
    created: str | None = None
    base_model: str | None = None
    steps: int | None = None


class AdapterList(BaseModel):
    adapters: list[AdapterSummary]


JobAccepted.model_rebuild()
