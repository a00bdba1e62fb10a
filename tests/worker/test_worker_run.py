"""A run's final state when the library refuses the input: failed, with the field under the API's name."""

from __future__ import annotations

from minidalle.errors import InvalidInput
from worker import lifecycle
from worker.run import run_job


def _fail_with(store, monkeypatch, kind: str, error: InvalidInput) -> dict:
    monkeypatch.setattr(lifecycle, "_store", store)
    job_id = store.create(kind, {"prompt": "p"})

    def body(run):
        raise error

    run_job(job_id, body)
    return store.get(job_id)


def test_a_library_error_fails_the_job_naming_the_api_field(store, monkeypatch):
    job = _fail_with(store, monkeypatch, "generate", InvalidInput("num_images_per_prompt", "at most 4 on this GPU"))
    assert job["state"] == "failed" and job["error"] == "num_images: at most 4 on this GPU"
    assert job["attempts"] == 1


def test_fields_the_api_spells_alike_keep_their_name(store, monkeypatch):
    job = _fail_with(store, monkeypatch, "generate", InvalidInput("adapters.0.scale", "must be in [-10, 10]"))
    assert job["error"] == "adapters.0.scale: must be in [-10, 10]"
