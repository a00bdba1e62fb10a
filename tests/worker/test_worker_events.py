"""A running job's events: the pipelined EventChannel and JobRun's batching / cancel checks, on a real redis-server."""

from __future__ import annotations

import json

import pytest
import redis

from jobs.events import EventChannel
from jobs.metrics import step_key
from jobs.store import JobStore, events_key, job_key
from worker import run as worker_run
from worker.settings import WorkerSettings


def _running(store: JobStore, worker: str = "w1") -> str:
    job_id = store.create("generate", {"prompt": "p"})
    assert store.claim(job_id, worker, stale_after_s=30, max_attempts=3).outcome == "run"
    return job_id


def _events(store: JobStore, job_id: str) -> list[tuple[str, dict]]:
    return [(f["type"], json.loads(f["data"])) for _, f in store.r.xrange(events_key(job_id))]


def _progress(step: int, total: int = 9) -> tuple[str, dict]:
    return ("progress", {"step": step, "total": total})


def test_channel_sends_without_waiting_and_reads_flags_later(store):
    job_id = _running(store)
    ch = EventChannel(store, job_id, "w1")
    ch.send([_progress(1), _progress(2)])
    ch.send([_progress(3)])  # reads the first batch's replies before writing the second
    assert ch.receive() == (False, True)
    assert ch.receive() is None  # nothing in flight
    store.cancel(job_id)
    ch.send([_progress(4)])
    assert ch.receive() == (True, True)
    ch.close()
    assert [d["step"] for t, d in _events(store, job_id) if t == "progress"] == [1, 2, 3, 4]
    assert json.loads(store.r.hget(job_key(job_id), "progress"))["step"] == 4
    # another worker took the job over: the old owner learns it from its next batch
    ch2 = EventChannel(store, job_id, "someone-else")
    ch2.send([])
    assert ch2.receive() == (True, False)
    ch2.close()


def test_channel_stays_in_step_after_a_failed_command(store, caplog):
    job_id = _running(store)
    ch = EventChannel(store, job_id, "w1")
    bad = ("HINCRBY", job_key(job_id), "state", 1)  # 'running' is not an integer: Redis refuses it
    ch.send([_progress(1)], extra=[bad])
    store.cancel(job_id)
    ch.send([_progress(2)], extra=[bad])  # reads the first batch (one refused command) and still sends this one
    with caplog.at_level("WARNING"):
        assert ch.receive() == (True, True)  # the flags are read all the same: the cancel is not missed
    assert "Redis refused 1 of 3 event commands" in caplog.text
    ch.send([_progress(3)])
    assert ch.receive() == (True, True)  # the replies did not shift: this is still the HMGET's
    ch.close()
    assert [d["step"] for t, d in _events(store, job_id) if t == "progress"] == [1, 2, 3]


def test_channel_reconnects_after_its_connection_is_killed(store):
    job_id = _running(store)
    ch = EventChannel(store, job_id, "w1")
    ch.send([_progress(1)])
    assert ch.receive() == (False, True)
    store.r.client_kill_filter(_type="normal", skipme=True)  # every client but this one, the channel's too
    with pytest.raises(redis.ConnectionError):
        ch.send([_progress(2)])
        ch.receive()
    ch.send([_progress(3)])
    assert ch.receive() == (False, True)
    ch.close()
    assert [d["step"] for t, d in _events(store, job_id) if t == "progress"][-1] == 3


def _run(store: JobStore, job_id: str, worker: str = "w1") -> worker_run.JobRun:
    settings = WorkerSettings(heartbeat_interval_s=30, generate_time_limit_s=600)
    return worker_run.JobRun(store, store.get(job_id), worker, settings)


def test_jobrun_sends_every_event_in_order_and_the_timings_at_the_end(store):
    job_id = _running(store)
    with _run(store, job_id) as run:
        for step in range(1, 26):
            run.step_done()
            run.publish({"step": step, "total": 25})
        run.emit({"index": 0, "url": "/images/x/0.png"}, event="image")
    events = _events(store, job_id)
    assert [t for t, _ in events] == ["queued", "started"] + ["progress"] * 25 + ["image"]
    assert [d["step"] for t, d in events if t == "progress"] == list(range(1, 26))
    assert json.loads(store.r.hget(job_key(job_id), "progress")) == {"step": 25, "total": 25}
    assert store.r.hget(step_key("generate"), "count") == "25"


def test_jobrun_stops_at_a_cancel_within_a_batch_or_two(store, monkeypatch):
    monkeypatch.setattr(worker_run, "PUBLISH_EVERY_S", 0.0)  # a batch per step: the count below is exact
    monkeypatch.setattr(worker_run, "WAIT_AFTER_STEP_S", 3600.0)  # short steps: replies are read a step later
    job_id = _running(store)
    with _run(store, job_id) as run:
        run.publish({"step": 1})
        run.flush()  # nothing in flight when the cancel comes
        store.cancel(job_id)
        run.publish({"step": 2})  # sends step 2; the reply is read during the next step
        with pytest.raises(worker_run.Stop) as e:
            run.publish({"step": 3})  # reads step 2's reply: cancelled
    assert e.value.reason == "cancelled"
    assert [d.get("step") for t, d in _events(store, job_id) if t == "progress"] == [1, 2, 3]


def test_jobrun_waits_for_the_reply_after_a_long_step(store, monkeypatch):
    monkeypatch.setattr(worker_run, "PUBLISH_EVERY_S", 0.0)
    monkeypatch.setattr(worker_run, "WAIT_AFTER_STEP_S", 0.0)  # every step counts as long
    job_id = _running(store)
    with _run(store, job_id) as run:
        run.publish({"step": 1})
        store.cancel(job_id)
        with pytest.raises(worker_run.Stop) as e:
            run.publish({"step": 2})  # the very next step sees it
    assert e.value.reason == "cancelled"


def test_jobrun_stops_when_another_worker_owns_the_job(store, monkeypatch):
    monkeypatch.setattr(worker_run, "PUBLISH_EVERY_S", 0.0)
    monkeypatch.setattr(worker_run, "WAIT_AFTER_STEP_S", 0.0)
    job_id = _running(store)
    store.r.hset(job_key(job_id), "worker", "w2")  # as a takeover after a stale heartbeat leaves it
    with _run(store, job_id) as run, pytest.raises(worker_run.Stop) as e:
        run.publish({"step": 1})
    assert e.value.reason == "lost"


def _record_sends(monkeypatch, *, fail_first: bool = False) -> list[int]:
    """Patch EventChannel.send to note each batch's size (and to fail the first with a ConnectionError)."""
    sizes: list[int] = []
    real_send = EventChannel.send

    def send(self, events, extra=()):
        sizes.append(len(events))
        if fail_first and len(sizes) == 1:
            raise redis.ConnectionError("Redis went away")
        return real_send(self, events, extra)

    monkeypatch.setattr(EventChannel, "send", send)
    return sizes


def test_jobrun_batches_fast_steps(store, monkeypatch):
    sent = _record_sends(monkeypatch)
    monkeypatch.setattr(worker_run, "PUBLISH_EVERY_S", 3600.0)
    job_id = _running(store)
    with _run(store, job_id) as run:
        for step in range(1, 51):
            run.publish({"step": step, "total": 50})
    # the first step goes out at once (a listener sees the job move), the other 49 with the run's end
    assert sent == [1, 49]
    assert [d["step"] for t, d in _events(store, job_id) if t == "progress"] == list(range(1, 51))


def test_jobrun_keeps_events_it_could_not_send_and_sends_them_later(store, monkeypatch):
    calls = _record_sends(monkeypatch, fail_first=True)
    monkeypatch.setattr(worker_run, "PUBLISH_EVERY_S", 0.0)
    job_id = _running(store)
    with _run(store, job_id) as run:
        for step in range(1, 6):
            run.publish({"step": step, "total": 5})
        run.emit({"index": 0}, event="image")
    assert calls[:2] == [1, 2]  # step 1 failed, went again with step 2
    events = _events(store, job_id)
    assert [d["step"] for t, d in events if t == "progress"] == [1, 2, 3, 4, 5]
    assert events[-1][0] == "image"


def test_the_time_limit_stops_between_steps_but_never_throws_away_the_last_one(store):
    """A step can't be interrupted: past the deadline the next step is not started, but a job whose last step
    finished past it keeps its work (admission refused what was estimated not to fit)."""
    job_id = _running(store)
    with _run(store, job_id) as run:
        run.deadline = 0.0  # long past
        run.publish({"step": 1, "total": 1})  # the only step is done: no Stop
    job_id = _running(store)
    with _run(store, job_id) as run, pytest.raises(worker_run.Stop) as e:
        run.deadline = 0.0
        run.publish({"step": 1, "total": 2})
    assert e.value.reason == "time_limit"
