"""Webhooks' contract half: the target policy, the event and its signature, and the delivery schedule (claim, lease,
retry, progress cooldown) against a real redis-server. The sending half is tests/worker/test_webhooks.py."""

from __future__ import annotations

import base64
import json
import time

import pytest
from _support.servers import wait_until
from standardwebhooks import Webhook

from jobs import webhooks as wh
from jobs.keys import KeyStore
from jobs.store import decode_job, job_key
from minidalle.errors import InvalidInput


def _wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    return wait_until(predicate, timeout, "the condition", interval=interval)


# -- the target policy --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "ftp://example.org/hook",
    "file:///etc/passwd",
    "example.org/hook",  # no scheme
    "http://user:pw@93.184.215.14/hook",
    "http://user@93.184.215.14/hook",
    "http:///hook",  # no host
    "http://[::1/hook",  # not a URL
    "",
    "http://93.184.215.14:99999/",  # invalid port
    "http://93.184.215.14\\@127.0.0.1/",  # a parser-differential trick
    "http://127.0.0.1:8000/hook",
    "http://localhost/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.1/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata: link-local
    "http://[::1]:8000/hook",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
    "http://[fe80::1]/",
    "http://0.0.0.0/",
    "http://224.0.0.1/",  # multicast
    "http://100.64.0.1/",  # shared address space (CGNAT): not public
    "http://240.0.0.1/",  # reserved
    "http://nonexistent.invalid/hook",  # .invalid never resolves
])
def test_check_url_refuses(url):
    with pytest.raises(InvalidInput) as e:
        wh.check_url(url, "")
    assert e.value.field == "webhook_url"


def test_check_url_accepts_a_public_address():
    wh.check_url("https://93.184.215.14/hooks?token=abc", "")  # an IP literal: no DNS needed


def test_allow_list_names_addresses_and_networks():
    wh.check_url("http://127.0.0.1:8000/hook", "127.0.0.1")
    wh.check_url("http://127.0.0.5:8000/hook", "10.0.0.0/8, 127.0.0.0/8")
    wh.check_url("http://[::1]:8000/hook", "::1")
    wh.check_url("http://localhost:8000/hook", "localhost")  # a host name: whatever it resolves to
    with pytest.raises(InvalidInput, match="MINIDALLE_WEBHOOK_ALLOW"):
        wh.check_url("http://127.0.0.1:8000/hook", "10.0.0.0/8")
    with pytest.raises(InvalidInput, match="does not resolve"):
        wh.check_url("http://nonexistent.invalid/", "nonexistent.invalid")  # allowed, but it must still resolve
    with pytest.raises(InvalidInput, match="credentials"):
        wh.check_url("http://u:p@127.0.0.1/", "127.0.0.1")  # the allow-list opens addresses, nothing else


def test_refusals_do_not_show_the_resolved_addresses():
    with pytest.raises(InvalidInput) as e:
        wh.check_url("http://localhost/", "")
    assert "127.0.0.1" not in str(e.value) and "::1" not in str(e.value)


def test_url_host_keeps_no_path_or_query():
    assert wh.url_host("https://Hooks.Example.org:8443/p/secret?token=x") == "hooks.example.org"


# -- the event ------------------------------------------------------------------------------------------------------
def _job(store, *, state="succeeded", **fields) -> dict:
    """A running or ended job carrying `fields`. An ended job gets them after it ended, so FINISH put nothing in
    the outbox: each test pushes what it means to (the same with or without FINISH's outbox wiring)."""
    job_id = store.create("generate", {"prompt": "a secret prompt"})
    store.claim(job_id, "worker@some-host", stale_after_s=30, max_attempts=3)
    store.r.hset(job_key(job_id), "owner", "anonymous")
    if state != "running":
        store.finish(job_id, state, result={"images": [{"url": f"/images/{job_id}/0.png", "seed": 1}]})
    if fields:
        store.r.hset(job_key(job_id), mapping=fields)
    return decode_job(store.r.hgetall(job_key(job_id)))


def test_event_carries_the_public_view_only(store):
    job = _job(store)
    payload = wh.event("job.succeeded", job, job["finished_at"])
    assert payload["type"] == "job.succeeded"
    assert payload["timestamp"].endswith("Z") and payload["timestamp"].startswith(time.strftime("%Y", time.gmtime()))
    assert set(payload["data"]) == {"id", "kind", "state", "created_at", "started_at", "finished_at", "progress",
                                    "result", "error"}
    body = wh.body_bytes(payload).decode()
    for internal in ("worker@some-host", "heartbeat_at", "owner", "anonymous", "a secret prompt", "request"):
        assert internal not in body


def test_signature_verifies_with_standardwebhooks():
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()
    body = wh.body_bytes({"type": "job.failed", "timestamp": wh.iso_utc(time.time()), "data": {"id": "x"}})
    headers = wh.sign(secret, wh.message_id("x", "failed"), body, time.time())
    assert headers["webhook-id"] == "x.failed"
    assert Webhook(secret).verify(body, headers)["type"] == "job.failed"
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(body.replace(b"failed", b"succeeded"), headers)


def test_key_secrets_are_standard_webhooks_secrets(store):
    keys = KeyStore(store.r)
    made = [keys.webhook_secret(keys.create(f"k{i}")[1]["id"]) for i in range(20)] + [keys.webhook_secret("anonymous")]
    for secret in made:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24
        assert wh.usable_secret(secret)


def test_an_unreadable_secret_is_not_used():
    assert wh.usable_secret("whsec_" + base64.b64encode(b"k" * 24).decode())
    assert not wh.usable_secret("whsec_")
    assert not wh.usable_secret("whsec_abcde")  # not base64 of anything


# -- the schedule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("end", ["finish", "cancel"])
def test_ending_a_job_with_a_webhook_puts_it_in_the_outbox_once(store, end):
    """The wiring this module relies on (jobs.lua): the terminal transition pushes the id, atomically with it."""
    with_hook = store.create("generate", {})
    store.r.hset(job_key(with_hook), "webhook_url", "http://example.org/")
    without = store.create("generate", {})
    for job_id in (with_hook, without):
        if end == "finish":
            store.claim(job_id, "w1", stale_after_s=30, max_attempts=3)
            store.finish(job_id, "failed", error="boom")
            store.finish(job_id, "succeeded")  # a late duplicate: no second push
        else:
            store.cancel(job_id)
            store.cancel(job_id)
    assert store.r.lrange(wh.OUTBOX_KEY, 0, -1) == [with_hook]


def test_claim_takes_the_outbox_once_and_complete_removes_it(store):
    q = wh.WebhookQueue(store.r)
    store.r.rpush(wh.OUTBOX_KEY, "job1")
    claimed, _ = q.claim(lease_s=30)
    assert claimed is not None and claimed.job_id == "job1"
    assert store.r.llen(wh.OUTBOX_KEY) == 0 and store.r.zscore(wh.RETRY_KEY, "job1") is not None  # leased
    other, wait = q.claim(lease_s=30)
    assert other is None and 29 < wait <= 30  # nothing to take; the lease ends in ~30 s
    assert q.complete(claimed, None, retry_in_s=None) is True
    assert store.r.zcard(wh.RETRY_KEY) == 0
    assert q.claim(lease_s=30) == (None, None)


def test_a_lease_that_runs_out_is_taken_by_another_worker(store):
    """A worker that died mid-delivery loses nothing: once its lease ends the entry is due again."""
    dead, alive = wh.WebhookQueue(store.r), wh.WebhookQueue(store.r)
    store.r.rpush(wh.OUTBOX_KEY, "job1")
    first, _ = dead.claim(lease_s=0.2)
    assert first is not None
    second = _wait_for(lambda: alive.claim(lease_s=30)[0])
    assert second.job_id == "job1" and second.lease != first.lease
    assert dead.complete(first, {"state": "delivered"}, retry_in_s=None) is False  # the fencing token: too late
    assert store.r.zscore(wh.RETRY_KEY, "job1") is not None
    assert alive.complete(second, None, retry_in_s=None) is True


def test_retry_is_not_taken_before_it_is_due_and_the_outcome_is_recorded(store):
    job = _job(store, webhook_url="http://example.org/")
    q = wh.WebhookQueue(store.r)
    store.r.rpush(wh.OUTBOX_KEY, job["id"])
    claimed, _ = q.claim(lease_s=30)
    outcome = {"url_host": "example.org", "attempts": 1, "state": "retrying", "last_status": 500,
               "last_error": "HTTP 500", "delivered_at": None, "next_attempt_at": None}
    assert q.complete(claimed, outcome, retry_in_s=0.3)
    recorded = json.loads(store.r.hget(job_key(job["id"]), "webhook"))
    assert recorded["state"] == "retrying" and recorded["last_status"] == 500
    assert recorded["next_attempt_at"] == pytest.approx(claimed.now + 0.3, abs=0.5)
    none, wait = q.claim(lease_s=30)
    assert none is None and 0 < wait <= 0.3
    again = _wait_for(lambda: q.claim(lease_s=30)[0])
    assert again.job_id == job["id"]
    assert q.complete(again, {**outcome, "attempts": 2, "state": "delivered", "last_status": 200,
                              "last_error": None}, retry_in_s=None)
    recorded = json.loads(store.r.hget(job_key(job["id"]), "webhook"))
    assert recorded["state"] == "delivered" and recorded["attempts"] == 2 and recorded["next_attempt_at"] is None
    assert recorded["delivered_at"] >= job["finished_at"]


def test_progress_note_needs_a_running_job_that_asked_for_progress(store):
    q = wh.WebhookQueue(store.r)
    wants = _job(store, state="running", webhook_url="http://example.org/", webhook_progress="1")
    silent = _job(store, state="running", webhook_url="http://example.org/", webhook_progress="0")
    ended = _job(store, webhook_url="http://example.org/", webhook_progress="1")
    for job in (wants, silent, ended):
        q.note_progress(job["id"])
    assert store.r.zrange(wh.PROGRESS_KEY, 0, -1) == [wants["id"]]


def test_progress_is_taken_at_most_once_per_interval(store):
    q = wh.WebhookQueue(store.r)
    job = _job(store, state="running", webhook_url="http://example.org/", webhook_progress="1")
    q.note_progress(job["id"])
    assert q.take_progress(every_s=0.5) == (job["id"], None)
    assert q.take_progress(every_s=0.5) == (None, None)  # taken: nothing left
    q.note_progress(job["id"])  # new progress within the cooldown: due when it ends
    taken, wait = q.take_progress(every_s=0.5)
    assert taken is None and 0 < wait <= 0.5
    started = time.monotonic()
    assert _wait_for(lambda: q.take_progress(every_s=0.5)[0]) == job["id"]
    assert time.monotonic() - started >= wait - 0.05
    store.finish(job["id"], "succeeded", result={})
    store.r.zadd(wh.PROGRESS_KEY, {job["id"]: 0})
    assert q.take_progress(every_s=0.5) == (None, None)  # the job ended: dropped
    assert store.r.zcard(wh.PROGRESS_KEY) == 0
