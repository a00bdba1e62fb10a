"""Response bodies. The request bodies are the job contract's (`jobs.requests`); the configurable caps are checked in
the routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.requests import AdapterRef, FinetuneRequest, GenerateRequest, ImportRequest

# re-exported: routes read every body from here
__all__ = ["AdapterRef", "FinetuneRequest", "GenerateRequest", "ImportRequest"]

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
    kind: Literal["generate", "finetune", "import"]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    owner: str = Field("anonymous", description="The id of the API key that made it.")
    estimate_s: float | None = Field(None, description="What admission estimated it costs one worker, in seconds.")
    webhook: dict[str, Any] | None = Field(None, description="Delivery of its webhook, when it asked for one.")
    progress: Progress | None = None
    request: dict[str, Any]
    result: dict[str, Any] | None = Field(None, description="generate: images (url, seed, metadata); "
                                                             "finetune, import: adapter (name, url, download_url).")
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
    visibility: Literal["private", "public"] = "private"
    mine: bool = Field(False, description="Made by the key that asks.")


class AdapterList(BaseModel):
    adapters: list[AdapterSummary]


JobAccepted.model_rebuild()
