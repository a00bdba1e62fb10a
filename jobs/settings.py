"""What every process kind (api, worker, serve) reads: where Redis and the data volume are, the model, job
lifetimes and time limits. The API's caps live in `service.settings`, the workers' device settings in
`worker.settings`; environment variables (`MINIDALLE_*`) are read in those three modules, nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class CommonSettings(BaseSettings):
    """Read by every process kind (api, worker, serve)."""

    model_config = SettingsConfigDict(env_prefix="MINIDALLE_", env_file=".env", extra="ignore")

    # None means "not configured": `minidalle serve` then starts its own redis-server; the others use the default.
    redis_url: str | None = None
    data_dir: Path = Path("data")
    # A local diffusers-layout folder or a hub id; empty = the tiny model embedded in the package.
    model: str = ""
    # Finished jobs (record + event stream) expire after this; a week is enough to fetch results.
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # Progress events are one per step; a 20k-step fine-tune must not grow a stream without bound.
    events_maxlen: int = Field(10_000, ge=100)
    # A running job refreshes its heartbeat this often; it is stale (worker presumed dead) after stale_after_s.
    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(30.0, gt=0)
    # A job whose worker died this many times is failed instead of being re-enqueued again.
    max_attempts: int = Field(3, ge=1)
    generate_time_limit_s: int = Field(15 * 60, ge=1)
    finetune_time_limit_s: int = Field(24 * 3600, ge=1)

    @property
    def broker_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def visibility_timeout_s(self) -> int:
        # Above the longest time limit, or Redis would hand a still-running fine-tune to a second worker.
        return max(self.generate_time_limit_s, self.finetune_time_limit_s) + 3600

    def time_limit_s(self, kind: str) -> int:
        return self.generate_time_limit_s if kind == "generate" else self.finetune_time_limit_s
