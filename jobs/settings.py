"""What every process kind (api, worker, serve) reads: where Redis and the data volume are, the model, job
lifetimes and time limits. The API's caps live in `service.settings`, the workers' device settings in
`worker.settings`; environment variables (`MINIDALLE_*`) are read in those three modules, nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.kinds import queue_of
from minidalle.embedded import default_model

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
    # The name the model is known by in answers, PNG metadata and adapter.json (never a server path); empty: the
    # folder's name or the hub id.
    model_id: str = ""
    # keys: every request needs `Authorization: Bearer <key>` (`minidalle keys create`); open: a request without a
    # key acts as the built-in admin `anonymous` (`minidalle serve` on a loopback address, one trusted user).
    auth: Literal["keys", "open"] = "keys"
    # A deployment's first admin key (compose: from .env); the API creates it in Redis at start if missing.
    admin_key: SecretStr | None = None
    # Webhooks: targets on private, loopback or link-local addresses are refused unless listed here
    # (comma-separated host names, IP addresses or CIDR networks, e.g. "127.0.0.1,10.0.0.0/8").
    webhook_allow: str = ""
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)  # then the outcome says "failed"
    webhook_backoff_s: float = Field(2.0, gt=0)  # first retry after this, doubling each time
    # A worker refreshes its presence this often (TTL 3x), so /readyz sees a dead worker within seconds.
    presence_interval_s: float = Field(1.0, gt=0)

    @property
    def broker_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def visibility_timeout_s(self) -> int:
        # Above the longest time limit, or Redis would hand a still-running fine-tune to a second worker.
        return max(self.generate_time_limit_s, self.finetune_time_limit_s) + 3600

    @field_validator("admin_key")
    @classmethod
    def _admin_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None  # `MINIDALLE_ADMIN_KEY=` (as in .env.example): not set
        if len(v.get_secret_value()) < 16:
            raise ValueError("MINIDALLE_ADMIN_KEY must be at least 16 characters (a long random secret)")
        return v

    @property
    def model_name(self) -> str:
        """`model_id`, else the model folder's name or the hub id (the embedded default: its folder name)."""
        if self.model_id:
            return self.model_id

        return Path(self.model.rstrip("/")).name if self.model and Path(self.model).is_dir() else \
            (self.model or Path(default_model()).name)

    def time_limit_s(self, kind: str) -> int:
        """The limit of the queue the kind runs on (an import: the generate queue's)."""
        return self.finetune_time_limit_s if queue_of(kind) == "finetune" else self.generate_time_limit_s
