"""GET /me (the key that asks: its limits and webhook secret), GET /usage (what keys have used)."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from jobs.keys import ANONYMOUS_ID, KeyStore
from jobs.store import JobStore, usage_key
from service.deps import PrincipalDep, StoreDep, VolumeDep
from service.errors import not_found
from service.routes.datasets import stored_bytes

router = APIRouter(tags=["account"])


@router.get("/me")
def me(principal: PrincipalDep, store: StoreDep) -> dict:
    """The key this request was made with: id, name, admin, limits, and the secret its webhooks are signed with."""
    return {"id": principal.id, "name": principal.name, "admin": principal.admin,
            "limits": {k: v for k, v in vars(principal.limits).items() if v is not None},
            "webhook_secret": KeyStore(store.r).webhook_secret(principal.id)}


def _usage(store: JobStore, volume, key_id: str) -> dict:
    raw = cast(dict[str, str], store.r.hgetall(usage_key(key_id)))
    jobs, seconds = store.active_usage(key_id)
    return {"key": key_id, "images": int(raw.get("images", 0)), "compute_s": round(float(raw.get("compute_s", 0)), 3),
            "finetune_steps": int(raw.get("finetune_steps", 0)),
            "jobs": {k.removeprefix("jobs:"): int(v) for k, v in sorted(raw.items()) if k.startswith("jobs:")},
            "active": {"jobs": jobs, "estimated_s": round(seconds, 3)},
            "bytes_stored": stored_bytes(volume, key_id)}


@router.get("/usage")
async def usage(principal: PrincipalDep, store: StoreDep, volume: VolumeDep,
                key: str | None = Query(None, description="Admin keys: one key's usage (default: every key's).")):
    """What this key has used: images made, compute seconds, fine-tune steps, jobs by kind and final state,
    what runs now, bytes stored. An admin key gets every key's."""
    if not principal.admin:
        if key not in (None, principal.id):
            raise not_found(f"key: key {key!r} not found")
        return await run_in_threadpool(_usage, store, volume, principal.id)
    ids = [key] if key else [r["id"] for r in await run_in_threadpool(KeyStore(store.r).list)] + [ANONYMOUS_ID]
    return {"keys": [await run_in_threadpool(_usage, store, volume, k) for k in ids]}


