"""The data volume's janitor against a real redis-server: what it removes, and everything it must keep."""

from __future__ import annotations

import os
import time
from pathlib import Path

from jobs import volume
from worker import janitor, lifecycle
from worker.settings import get_worker_settings

DAY = 24 * 3600.0
TTL = 7 * DAY


def _folder(path: Path, age_s: float, files: dict[str, float] | None = None) -> Path:
    """A folder with files; every mtime set `age_s` ago unless `files` gives a file its own age."""
    path.mkdir(parents=True)
    (path / "a.png").write_bytes(b"x")
    for name in files or {}:
        (path / name).write_bytes(b"y")
    then = time.time() - age_s
    for p in sorted(path.rglob("*"), reverse=True) + [path]:
        os.utime(p, (then, then))
    for name, age in (files or {}).items():
        t = time.time() - age
        os.utime(path / name, (t, t))
    return path


def _id(n: int) -> str:
    return f"{n:032x}"


def test_job_folders_go_only_when_their_record_expired_and_nothing_changed_for_the_ttl(store, tmp_path):
    jobs = tmp_path / "jobs"
    expired = _folder(jobs / _id(1), 8 * DAY)
    recorded = store.create("generate", {"prompt": "p"})
    still_recorded = _folder(jobs / recorded, 30 * DAY)
    touched_lately = _folder(jobs / _id(2), 30 * DAY, files={"checkpoints": 1 * DAY})  # e.g. Redis lost its data
    young = _folder(jobs / _id(3), 1 * DAY)
    not_ours = _folder(jobs / "notes", 30 * DAY)
    removed = janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=TTL)
    assert removed["jobs"] == [_id(1)]
    assert not expired.exists()
    assert all(p.exists() for p in (still_recorded, touched_lately, young, not_ours))
    assert not [p for p in jobs.iterdir() if p.name.startswith(".deleting-")]


def test_datasets_go_when_unused_for_the_ttl_unless_a_queued_finetune_names_them(store, tmp_path):
    ds = tmp_path / "datasets"
    old = _folder(ds / _id(10), 8 * DAY)
    wanted = _folder(ds / _id(11), 8 * DAY)
    store.create("finetune", {"name": "x", "dataset_id": _id(11)})  # queued: its dataset must stay
    recent = _folder(ds / _id(12), 2 * DAY)
    trained_on = _folder(ds / _id(13), 8 * DAY)
    volume.mark_used(trained_on)  # a fine-tune started on it just now
    assert janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=0)["datasets"] == []  # 0: keep forever
    removed = janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=TTL)
    assert removed["datasets"] == [_id(10)]
    assert not old.exists() and wanted.exists() and recent.exists() and trained_on.exists()


def test_interrupted_uploads_and_removals_are_cleared_after_an_hour(store, tmp_path):
    stale = _folder(tmp_path / "datasets" / f".incoming-{_id(20)}", 2 * 3600)
    in_progress = _folder(tmp_path / "datasets" / f".incoming-{_id(21)}", 60)
    half_removed = _folder(tmp_path / "jobs" / f".deleting-{_id(22)}-abcd1234", 2 * 3600)
    removed = janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=TTL)
    assert sorted(removed["leftovers"]) == [f"datasets/.incoming-{_id(20)}", f"jobs/.deleting-{_id(22)}-abcd1234"]
    assert not stale.exists() and not half_removed.exists() and in_progress.exists()


def test_lora_uploads_no_live_import_names_go_after_an_hour(store, tmp_path):
    uploads = tmp_path / "uploads"
    orphan = _folder(uploads / _id(30), 2 * 3600)  # the API stopped between storing it and queuing its job
    queued = _folder(uploads / _id(31), 2 * 3600)
    store.create("import", {"name": "x", "upload_id": _id(31)})  # waits in a long queue: its file must stay
    fresh = _folder(uploads / _id(32), 60)  # its job is being created right now
    removed = janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=TTL)
    assert removed["uploads"] == [_id(30)]
    assert not orphan.exists() and queued.exists() and fresh.exists()


def test_one_sweep_per_interval_across_workers(store, tmp_path, monkeypatch):
    url = "redis://{host}:{port}/{db}".format(**store.r.connection_pool.connection_kwargs)
    monkeypatch.setenv("MINIDALLE_REDIS_URL", url)
    monkeypatch.setenv("MINIDALLE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MINIDALLE_JANITOR_INTERVAL_S", "3600")
    get_worker_settings.cache_clear()
    try:
        _folder(tmp_path / "jobs" / _id(30), 30 * DAY)
        assert lifecycle.sweep_if_due(store)["jobs"] == [_id(30)]
        _folder(tmp_path / "jobs" / _id(31), 30 * DAY)
        assert lifecycle.sweep_if_due(store) is None  # another worker (or this one) swept within the hour
        assert (tmp_path / "jobs" / _id(31)).exists()
    finally:
        get_worker_settings.cache_clear()


def test_a_folder_that_fails_mid_pass_is_skipped_not_the_whole_pass(store, tmp_path, monkeypatch):
    vanishing = _folder(tmp_path / "jobs" / _id(40), 30 * DAY)
    other = _folder(tmp_path / "jobs" / _id(41), 30 * DAY)
    real = janitor.newest_mtime

    def flaky(path):
        if path.name == vanishing.name:
            raise FileNotFoundError(path)  # e.g. another sweep removed it a moment ago
        return real(path)

    monkeypatch.setattr(janitor, "newest_mtime", flaky)
    assert janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=TTL)["jobs"] == [_id(41)]
    assert not other.exists()


def test_a_dataset_named_by_a_new_finetune_during_the_sweep_is_put_back(store, tmp_path, monkeypatch):
    ds = _folder(tmp_path / "datasets" / _id(50), 8 * DAY)
    answers = iter([set(), {_id(50)}])  # unused when the pass starts; a fine-tune names it before the delete
    monkeypatch.setattr(janitor, "datasets_in_use", lambda store: next(answers))
    assert janitor.sweep(store, tmp_path, job_ttl_s=TTL, dataset_ttl_s=TTL)["datasets"] == []
    assert (ds / "a.png").is_file()
    assert [p.name for p in ds.parent.iterdir()] == [_id(50)]
