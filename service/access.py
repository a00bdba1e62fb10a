"""Ownership: what a key may see. Another key's jobs, datasets and adapters are 404 (not 403: nobody learns what
exists); an admin key sees and manages everything; an adapter its owner made public is readable by every key (and
still only its owner or an admin may change or delete it: 403 for the others, who can see it)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import HTTPException

from jobs.keys import Principal
from jobs.store import JobStore
from jobs.volume import ADAPTER_META, Volume, dataset_owner, is_adapter_name, is_id, read_access
from service.errors import not_found


def job_of(store: JobStore, principal: Principal, job_id: str) -> dict:
    """The job, if this key may see it; else 404 (as if it did not exist)."""
    job = store.get(job_id) if is_id(job_id) else None
    if job is None or not principal.owns(job["owner"]):
        raise not_found(f"job_id: job {job_id!r} not found")
    return job


def dataset_of(volume: Volume, principal: Principal, dataset_id: str) -> Path:
    if not volume.dataset_exists(dataset_id) or not principal.owns(dataset_owner(volume.dataset(dataset_id))):
        raise not_found(f"dataset_id: dataset {dataset_id!r} not found")
    return volume.dataset(dataset_id)


def can_read_adapter(principal: Principal, access: dict) -> bool:
    return principal.owns(access["owner"]) or access["visibility"] == "public"


def adapter_of(volume: Volume, principal: Principal, name: str, *, field: str = "name",
               write: bool = False) -> Path:
    """A published adapter this key may read (`write`: change or delete); 404 if it may not even see it."""
    if not volume.adapter_exists(name):
        raise not_found(f"{field}: adapter {name!r} not found")
    path = volume.adapter(name)
    access = read_access(path)
    if not can_read_adapter(principal, access):
        raise not_found(f"{field}: adapter {name!r} not found")
    if write and not principal.owns(access["owner"]):
        raise HTTPException(403, f"{field}: adapter {name!r} is shared read-only; only its owner can change it")
    return path


def readable_adapters(volume: Volume, principal: Principal) -> list[tuple[str, dict, dict]]:
    """(name, adapter.json, access) of every adapter this key may read, by name."""
    out = []
    root = volume.adapters
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not (is_adapter_name(d.name) and (d / ADAPTER_META).is_file()):
            continue
        access = read_access(d)
        if not can_read_adapter(principal, access):
            continue
        try:
            out.append((d.name, json.loads((d / ADAPTER_META).read_text()), access))
        except (OSError, ValueError):
            continue  # deleted or being replaced while we listed
    return out
