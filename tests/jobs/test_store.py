"""The job record's atomic transitions (Lua scripts) against a real redis-server."""

from __future__ import annotations

import json
import time

from jobs.store import ACTIVE_KEY, STATS_KEY, JobStore, events_key, job_key


def _events(store: JobStore, job_id: str) -> list[str]:
    return [f["type"] for _, f in store.r.xrange(events_key(job_id))]


def test_claim_runs_once_and_a_duplicate_delivery_is_busy(store):
    job_id = store.create("generate", {"prompt": "x"})
    assert store.claim(job_id, "w1", stale_after_s=30, max_attempts=3).outcome == "run"
    second = store.claim(job_id, "w2", stale_after_s=30, max_attempts=3)
    assert (second.outcome, second.detail) == ("busy", "w1")
    assert store.get(job_id)["attempts"] == 1 and store.get(job_id)["worker"] == "w1"
    assert _events(store, job_id) == ["queued", "started"]


def test_stale_running_job_is_taken_over_and_the_old_owner_loses_it(store):
    job_id = store.create("generate", {})
    store.claim(job_id, "w1", stale_after_s=30, max_attempts=3)
    store.r.hset(job_key(job_id), "heartbeat_at", "0")
    assert store.claim(job_id, "w2", stale_after_s=30, max_attempts=3).outcome == "run"
    assert store.get(job_id)["attempts"] == 2
    assert store.heartbeat(job_id, "w1") is False  # w1's heartbeat thread notices: it stops at its next step
    assert store.heartbeat(job_id, "w2") is True
    assert store.publish_batch(job_id, "w1", [("progress", {"step": 1, "total": 2})]) == (False, False)


def test_finish_happens_once_and_expires_with_stats(store):
    job_id = store.create("generate", {})
    store.claim(job_id, "w1", stale_after_s=30, max_attempts=3)
    assert store.finish(job_id, "succeeded", result={"images": []}) is True
    assert store.finish(job_id, "failed", error="late duplicate") is False
    job = store.get(job_id)
    assert job["state"] == "succeeded" and job["error"] is None and job["result"] == {"images": []}
    assert 0 < store.r.ttl(job_key(job_id)) <= 120 and 0 < store.r.ttl(events_key(job_id)) <= 120
    assert not store.r.sismember(ACTIVE_KEY, job_id)
    assert store.r.hget(STATS_KEY, "generate:succeeded") == "1"
    assert store.claim(job_id, "w2", stale_after_s=30, max_attempts=3).outcome == "finished"
    last = store.r.xrevrange(events_key(job_id), count=1)[0][1]
    assert last["type"] == "succeeded" and json.loads(last["data"])["result"] == {"images": []}


def test_cancel_queued_vs_running_vs_finished(store):
    queued = store.create("generate", {})
    assert store.cancel(queued) == "cancelled"
    assert store.get(queued)["state"] == "cancelled"
    assert store.get(queued)["cancel_requested"] is True  # as for a running job that was cancelled
    assert store.claim(queued, "w1", stale_after_s=30, max_attempts=3).outcome == "finished"

    running = store.create("finetune", {"name": "a"})
    store.claim(running, "w1", stale_after_s=30, max_attempts=3)
    assert store.cancel(running) == "requested"
    assert store.cancel(running) == "requested"  # idempotent: one event
    assert _events(store, running).count("cancel_requested") == 1
    assert store.publish_batch(running, "w1", [("progress", {"step": 1, "total": 9})]) == (True, True)
    assert store.get(running)["state"] == "running"
    store.finish(running, "cancelled")
    assert store.cancel(running) == "finished"
    assert store.cancel("0" * 32) == "missing"


def test_reconcile_requeues_stale_enqueues_orphans_and_gives_up(store):
    stale = store.create("generate", {})
    store.claim(stale, "w1", stale_after_s=30, max_attempts=3)
    store.r.hset(job_key(stale), "heartbeat_at", "0")
    fresh = store.create("generate", {})
    store.claim(fresh, "w1", stale_after_s=30, max_attempts=3)
    orphan = store.create("generate", {})  # recorded, never enqueued
    kw = dict(stale_after_s=30, max_attempts=3, enqueue_grace_s=10)
    assert store.reconcile_one(stale, **kw) == "requeue"
    assert store.get(stale)["state"] == "queued" and "requeued" in _events(store, stale)
    assert store.reconcile_one(fresh, **kw) == "ok"
    assert store.reconcile_one(orphan, **kw) == "ok"  # still inside the grace period
    store.r.hset(job_key(orphan), "created_at", "0")
    assert store.reconcile_one(orphan, **kw) == "enqueue"
    assert store.reconcile_one(orphan, **kw) == "ok"  # marked enqueued: once
    store.r.hset(job_key(stale), mapping={"state": "running", "attempts": 3, "heartbeat_at": "0"})
    assert store.reconcile_one(stale, **kw) == "exhausted"


def test_adapter_name_hold(store):
    a = store.create("finetune", {"name": "x"})
    assert store.reserve_adapter_name("x", a) is True
    b = store.create("finetune", {"name": "x"})
    assert store.reserve_adapter_name("x", b) is False
    store.finish(a, "failed", error="boom")  # ended without releasing: the hold is stale
    assert store.reserve_adapter_name("x", b) is True
    store.release_adapter_name("x", a)  # not the holder: no effect
    assert store.r.get("minidalle:adapter-reserved:x") == b


def test_list_filters_and_counts(store):
    ids = [store.create("generate", {}) for _ in range(3)] + [store.create("finetune", {"name": "n"})]
    store.finish(ids[0], "failed", error="x")
    jobs = store.list_jobs(kind="generate", limit=10)
    assert [j["id"] for j in jobs] == ids[2::-1]
    assert [j["id"] for j in store.list_jobs(state="failed")] == [ids[0]]
    assert [j["id"] for j in store.list_jobs(limit=2)] == [ids[3], ids[2]]
    counts = store.counts()
    assert counts[("generate", "queued")] == 2 and counts[("generate", "failed")] == 1
    assert counts[("finetune", "queued")] == 1
    store.r.delete(job_key(ids[1]))  # expired: dropped from the index while listing
    assert ids[1] not in [j["id"] for j in store.list_jobs(limit=10)]


def test_a_recorded_job_whose_enqueue_fails_is_left_to_the_reconciler(store, monkeypatch):
    """The API answers 202 for it (a retry would make a second job); the reconciler enqueues it later."""
    from kombu.exceptions import OperationalError

    from service import views

    def broker_down(queue, kind, job_id):
        raise OperationalError("Error 111 connecting to redis:6379. Connection refused.")

    monkeypatch.setattr(views, "enqueue", broker_down)
    job_id = store.create("generate", {"prompt": "p"})
    views.enqueue_recorded(store, None, "generate", job_id)  # no exception
    assert store.r.hget(job_key(job_id), "enqueued") == "0"  # the reconciler's "recorded, never enqueued" case
    store.r.hset(job_key(job_id), "created_at", repr(time.time() - 60))
    assert store.reconcile_one(job_id, stale_after_s=30, max_attempts=3, enqueue_grace_s=10) == "enqueue"


def test_admission_accounting_follows_every_transition_back_to_zero(store):
    """What waits per queue and what each key has live goes up at admission and back down with each job's end,
    through claims, requeues, stale takeovers and cancels."""
    from jobs.store import Bounds

    def admit(owner: str, kind: str = "generate", est: float = 2.0) -> str:
        job_id = store.r.execute_command("INCR", "test:ids")
        job_id = f"{int(job_id):032x}"
        assert store.admit(kind, {"prompt": "p"}, job_id=job_id, owner=owner, estimate_s=est, bounds=Bounds()).ok
        return job_id

    a, b, c, d = admit("k1"), admit("k1"), admit("k2"), admit("k2", "finetune", 10.0)
    assert store.queued("generate") == (3, 6.0) and store.queued("finetune") == (1, 10.0)
    assert store.active_usage("k1") == (2, 4.0) and store.active_usage("k2") == (2, 12.0)
    assert store.claim(a, "w1", stale_after_s=30, max_attempts=3).outcome == "run"
    assert store.queued("generate") == (2, 4.0) and store.active_usage("k1") == (2, 4.0)  # running still counts
    assert store.requeue(a, "w1", "shutdown")
    assert store.queued("generate") == (3, 6.0)
    assert store.claim(a, "w2", stale_after_s=30, max_attempts=3).outcome == "run"
    store.finish(a, "succeeded", result={})
    assert store.queued("generate") == (2, 4.0) and store.active_usage("k1") == (1, 2.0)
    assert store.cancel(b) == "cancelled"  # queued: leaves the queue and the key at once
    assert store.queued("generate") == (1, 2.0) and store.active_usage("k1") == (0, 0.0)
    store.finish(b, "failed", error="again")  # a second end changes nothing
    assert store.active_usage("k1") == (0, 0.0)
    assert store.claim(c, "w1", stale_after_s=30, max_attempts=3).outcome == "run"
    store.r.hset(f"minidalle:job:{c}", "heartbeat_at", "0")  # its worker died
    assert store.reconcile_one(c, stale_after_s=30, max_attempts=3, enqueue_grace_s=10) == "requeue"
    assert store.queued("generate") == (1, 2.0)
    assert store.claim(c, "w2", stale_after_s=30, max_attempts=3).outcome == "run"
    store.finish(c, "succeeded", result={})
    assert store.cancel(d) == "cancelled"
    assert store.queued("generate") == (0, 0.0) and store.queued("finetune") == (0, 0.0)
    assert store.active_usage("k2") == (0, 0.0)


def test_admission_refuses_past_the_bounds_atomically(store):
    from jobs.store import Bounds

    bounds = Bounds(queued_jobs=2, queued_seconds=100, key_jobs=5, key_seconds=100)
    ids = [f"{i:032x}" for i in range(1, 4)]
    results = [store.admit("generate", {}, job_id=j, owner="k", estimate_s=1.0, bounds=bounds) for j in ids]
    assert [r.ok for r in results] == [True, True, False] and results[2].reason == "queue_full"
    assert results[2].waiting_s == 2.0 and store.get(ids[2]) is None  # refused: no record at all
    big = store.admit("generate", {}, job_id="f" * 32, owner="k2", estimate_s=200.0,
                      bounds=Bounds(key_seconds=100))
    assert not big.ok and big.reason == "key_seconds"


def _admit_batchable(store: JobStore, key: str, images: int = 1) -> str:
    from jobs.store import Bounds
    from jobs.volume import new_id

    job_id = new_id()
    assert store.admit("generate", {"prompt": "x", "num_images": images}, job_id=job_id, owner="anonymous",
                       estimate_s=1.0, bounds=Bounds(), batch_key=key).ok
    return job_id


def test_claim_batchable_takes_the_oldest_queued_jobs_of_one_key_up_to_a_number_of_images(store):
    a1, a2, a3 = (_admit_batchable(store, "A", images=n) for n in (2, 3, 1))
    b1 = _admit_batchable(store, "B")
    gone = _admit_batchable(store, "A")
    assert store.cancel(gone) == "cancelled"  # ended while queued: skipped (and unlisted)
    taken = store.claim_batchable("A", "w1", max_images=4, stale_after_s=30, max_attempts=3)
    # a1 (2) fits, a2 (3) does not fit the 2 left (it stays for another batch), a3 (1) fits
    assert [(c.job_id, c.claim.outcome) for c in taken] == [(a1, "run"), (a3, "run")]
    assert store.get(a1)["state"] == "running" and store.get(a1)["worker"] == "w1"
    assert store.get(a2)["state"] == "queued" and store.get(b1)["state"] == "queued"
    assert store.queued("generate")[0] == 2  # the admission counters follow the claims
    assert store.r.zrange("minidalle:batchable:A", 0, -1) == [a2]
    # another worker's delivery of a claimed job is a duplicate; a claimed job is never claimed by a batch again
    assert store.claim(a1, "w2", stale_after_s=30, max_attempts=3).outcome == "busy"
    assert store.claim_batchable("A", "w2", max_images=8, stale_after_s=30, max_attempts=3)[0].job_id == a2
    assert store.claim_batchable("A", "w3", max_images=8, stale_after_s=30, max_attempts=3) == []


def test_a_requeued_generate_job_can_be_batched_again(store):
    job_id = _admit_batchable(store, "K")
    job = store.get(job_id)
    assert job["batch_key"] == "K"
    assert store.claim(job_id, "w1", stale_after_s=30, max_attempts=3).outcome == "run"
    store.unlist_batchable(job)
    assert store.claim_batchable("K", "w2", max_images=8, stale_after_s=30, max_attempts=3) == []
    assert store.requeue(job_id, "w1", "worker shutting down")
    store.list_batchable(job)
    assert [c.job_id for c in store.claim_batchable("K", "w2", max_images=8, stale_after_s=30, max_attempts=3)] \
        == [job_id]
