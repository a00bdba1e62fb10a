"""What the data volume no longer needs, removed: a job's folder once its record expired, datasets nobody used for a
while, uploads that died half-way. Torch-free; run by the workers' reconciler loop, once per interval across all
workers (a Redis lock).

    jobs/{id}/          removed when the job's record is gone from Redis (it expires `job_ttl_s` after the job
                        ended) and nothing in the folder changed for `job_ttl_s` either (so a Redis that lost its
                        data does not take fresh results with it)
    datasets/{id}/      removed when unused for `dataset_ttl_s` (uploaded, or last trained on, that long ago) and no
                        queued or running fine-tune names it; `dataset_ttl_s = 0` keeps datasets forever
    datasets/.incoming-*, .deleting-*    leftovers of an upload or a removal that was interrupted: after an hour
    uploads/{id}/       a LoRA file for an import job (its job removes it when it ends) or a variation's image:
                        one no queued or running job names (ended, the API stopped before it queued the job, a lost
                        record) goes after an hour

Adapters are never removed here (only `DELETE /adapters/{name}` does). A folder is first renamed to `.deleting-…`
and then deleted, so a half-removed folder is never served as a job's or a dataset's.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from jobs.store import JobStore, job_key
from jobs.volume import Volume, is_id, remove_tree, subdirs

log = logging.getLogger(__name__)
LEFTOVER_PREFIXES = (".incoming-", ".deleting-")
LEFTOVER_AFTER_S = 3600.0


def newest_mtime(path: Path) -> float:
    """The latest modification time of the folder or anything in it."""
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def named_by_live_jobs(store: JobStore, kind: str, field: str) -> set[str]:
    """The `field` of every queued or running job of `kind` (dataset ids of fine-tunes, upload ids of imports)."""
    used = set()
    for job_id in store.active_ids():
        job = store.get(job_id)
        if job and job["kind"] == kind and job.get("request"):
            used.add(job["request"].get(field))
    return used


def datasets_in_use(store: JobStore) -> set[str]:
    return named_by_live_jobs(store, "finetune", "dataset_id")


def sweep(store: JobStore, data_dir: Path, *, job_ttl_s: float, dataset_ttl_s: float,
          now: float | None = None) -> dict[str, list[str]]:
    """One pass; returns what was removed, by kind. A folder that vanishes or fails mid-pass is skipped."""
    now = time.time() if now is None else now
    removed: dict[str, list[str]] = {"jobs": [], "datasets": [], "uploads": [], "leftovers": []}

    def each(parent: Path, decide) -> None:
        for d in subdirs(parent):
            try:
                decide(d)
            except OSError as e:  # gone meanwhile (another sweep, a DELETE), or unreadable: the next pass retries
                log.warning("janitor: skipped %s: %s", d, e)

    def leftover(d: Path) -> None:
        if d.name.startswith(LEFTOVER_PREFIXES) and now - newest_mtime(d) >= LEFTOVER_AFTER_S:
            shutil.rmtree(d, ignore_errors=True)
            removed["leftovers"].append(f"{d.parent.name}/{d.name}")

    def job(d: Path) -> None:
        if is_id(d.name) and not store.r.exists(job_key(d.name)) and now - newest_mtime(d) >= job_ttl_s:
            remove_tree(d)
            removed["jobs"].append(d.name)

    def dataset(d: Path) -> None:
        if not is_id(d.name) or d.name in in_use or now - d.stat().st_mtime < dataset_ttl_s:
            return  # the folder's mtime: uploaded, or last trained on / submitted for training
        doomed = d.with_name(f".deleting-{d.name}-{uuid.uuid4().hex[:8]}")
        os.rename(d, doomed)
        if d.name in datasets_in_use(store):  # a fine-tune named it while we looked: put it back
            os.rename(doomed, d)
            return
        shutil.rmtree(doomed, ignore_errors=True)
        removed["datasets"].append(d.name)

    def upload(d: Path) -> None:
        if is_id(d.name) and d.name not in uploads and now - newest_mtime(d) >= LEFTOVER_AFTER_S:
            remove_tree(d)
            removed["uploads"].append(d.name)

    vol = Volume(data_dir)
    each(vol.jobs, leftover)
    each(vol.datasets, leftover)
    each(vol.uploads, leftover)
    each(vol.jobs, job)
    uploads = named_by_live_jobs(store, "import", "upload_id") | named_by_live_jobs(store, "generate", "image_id")
    each(vol.uploads, upload)
    if dataset_ttl_s > 0:
        in_use = datasets_in_use(store)
        each(vol.datasets, dataset)
    for kind, names in removed.items():
        if names:
            log.info("janitor: removed %d %s: %s", len(names), kind, ", ".join(names[:20]))
    return removed
