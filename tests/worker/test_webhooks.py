"""Webhook delivery end to end: real delivery threads (as each worker process runs them), a real redis-server and a
real HTTP receiver on 127.0.0.1 that checks every signature with the `standardwebhooks` package."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from _support.servers import wait_until
from standardwebhooks import Webhook

from jobs import webhooks as wh
from jobs.keys import ANONYMOUS_SECRET, KEY_PREFIX, KeyStore
from jobs.settings import CommonSettings
from jobs.store import JobStore, job_key
from worker import webhooks


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    return wait_until(predicate, timeout, "the condition", interval=interval)


class Receiver:
    """An HTTP server that records each request (path, headers, body, arrival time) and answers with the next
    status of `statuses`, then `default`; a 3xx points at /internal, which must never be asked for."""

    def __init__(self, statuses=(), default=200, delay_s=0.0):
        self.requests: list[dict] = []
        self.statuses, self.default, self.delay_s = list(statuses), default, delay_s
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": headers, "body": body,
                                              "at": time.monotonic()})
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                time.sleep(receiver.delay_s)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", f"http://127.0.0.1:{receiver.port}/internal")
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook?token=client-secret"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def received(self, webhook_type: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if webhook_type is None or json.loads(r["body"])["type"] == webhook_type]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kw) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def valid_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@pytest.fixture(autouse=True)
def anonymous_secret(store) -> str:
    """A Standard Webhooks secret for the anonymous principal, set before KeyStore makes one: see
    tests/jobs/test_webhooks.py::test_key_secrets_are_standard_webhooks_secrets for why."""
    secret = valid_secret()
    store.r.set(ANONYMOUS_SECRET, secret)
    return secret


def settings(**kw) -> CommonSettings:
    values = {"webhook_allow": "127.0.0.1", "webhook_timeout_s": 2.0, "webhook_max_attempts": 5,
              "webhook_backoff_s": 0.1, **kw}
    return CommonSettings(**values)


@pytest.fixture
def deliverers(store, monkeypatch):
    """Start delivery threads (each like one worker process); all are stopped, and must end, after the test."""
    monkeypatch.setattr(webhooks, "POLL_S", 0.2)  # idle waits are shorter: threads stop sooner after each test
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(s: CommonSettings, *, on: JobStore | None = None, **kw) -> threading.Thread:
        threads.append(webhooks.start(on or store, s, stop, name=f"webhooks-{len(threads)}", **kw))
        return threads[-1]

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive(), "a delivery thread did not stop"


def ended_job(store, url: str, *, state: str = "succeeded", owner: str = "anonymous") -> str:
    """A job that ended with a webhook, in the outbox once. The webhook fields are set after FINISH and the id
    pushed here, so the test is the same whether FINISH pushes it (jobs.lua's wiring) or not."""
    job_id = store.create("generate", {"prompt": "a secret prompt"})
    store.claim(job_id, "worker@internal-host", stale_after_s=30, max_attempts=3)
    store.finish(job_id, state, result={"images": [{"url": f"/images/{job_id}/0.png", "seed": 7}]},
                 error="boom" if state == "failed" else "")
    store.r.hset(job_key(job_id), mapping={"owner": owner, "webhook_url": url, "webhook_progress": "0"})
    store.r.rpush(wh.OUTBOX_KEY, job_id)
    return job_id


def outcome(store, job_id: str) -> dict | None:
    raw = store.r.hget(job_key(job_id), "webhook")
    return json.loads(raw) if raw else None


def outcome_is(store, job_id: str, state: str) -> dict | None:
    o = outcome(store, job_id)
    return o if o and o["state"] == state else None


def nothing_scheduled(store) -> bool:
    return store.r.llen(wh.OUTBOX_KEY) == 0 and store.r.zcard(wh.RETRY_KEY) == 0


# -- terminal events ------------------------------------------------------------------------------------------------
def test_an_ended_job_is_delivered_once_signed_with_its_keys_secret(store, receivers, deliverers):
    receiver = receivers()
    keys = KeyStore(store.r)
    _, key = keys.create("alice")
    store.r.hset(KEY_PREFIX + keys.find(key["id"]), "webhook_secret", valid_secret())  # see anonymous_secret
    deliverers(settings())  # already waiting on the outbox: the push wakes it
    job_id = ended_job(store, receiver.url, owner=key["id"])
    done = wait_for(lambda: outcome_is(store, job_id, "delivered"))
    assert nothing_scheduled(store) and len(receiver.received()) == 1  # nothing left that could send it again

    request = receiver.received()[0]
    payload = Webhook(keys.webhook_secret(key["id"])).verify(request["body"], request["headers"])
    with pytest.raises(Exception, match="signature"):  # another key's secret does not verify it
        Webhook(keys.webhook_secret("anonymous")).verify(request["body"], request["headers"])
    assert request["headers"]["webhook-id"] == f"{job_id}.succeeded"
    assert request["headers"]["host"] == f"127.0.0.1:{receiver.port}"
    assert request["path"] == "/hook?token=client-secret"
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job_id and payload["data"]["state"] == "succeeded"
    assert payload["data"]["result"] == {"images": [{"url": f"/images/{job_id}/0.png", "seed": 7}]}
    assert set(payload["data"]) == set(wh.PUBLIC_FIELDS)
    for internal in (b"internal-host", b"worker", key["id"].encode(), b"owner", b"a secret prompt", b"heartbeat"):
        assert internal not in request["body"]

    assert done["url_host"] == "127.0.0.1" and done["attempts"] == 1 and done["last_status"] == 200
    assert done["last_error"] is None and done["next_attempt_at"] is None and done["delivered_at"] > 0
    assert "client-secret" not in json.dumps(done)  # the query is the client's; the outcome shows the host only


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_failed_and_cancelled_jobs_have_their_own_event(store, receivers, deliverers, state):
    receiver = receivers()
    deliverers(settings())
    job_id = ended_job(store, receiver.url, state=state)
    wait_for(lambda: outcome_is(store, job_id, "delivered"))
    request = receiver.received()[0]
    payload = Webhook(KeyStore(store.r).webhook_secret("anonymous")).verify(request["body"], request["headers"])
    assert payload["type"] == f"job.{state}" and request["headers"]["webhook-id"] == f"{job_id}.{state}"
    assert payload["data"]["error"] == ("boom" if state == "failed" else None)


def test_failures_are_retried_with_backoff_then_delivered(store, receivers, deliverers):
    receiver = receivers(statuses=[500, 500, 200])
    deliverers(settings(webhook_backoff_s=0.2))
    job_id = ended_job(store, receiver.url)
    done = wait_for(lambda: outcome_is(store, job_id, "delivered"))
    assert done["attempts"] == 3 and done["last_status"] == 200 and done["last_error"] is None
    assert nothing_scheduled(store)

    got = receiver.received()
    assert len(got) == 3
    assert got[1]["at"] - got[0]["at"] >= 0.2 - 0.02  # 0.2 s, then doubled
    assert got[2]["at"] - got[1]["at"] >= 0.4 - 0.02
    assert len({r["headers"]["webhook-id"] for r in got}) == 1  # a receiver dedupes retries by it
    assert len({r["body"] for r in got}) == 1  # the event is the same; only the attempt's signature changes
    secret = KeyStore(store.r).webhook_secret("anonymous")
    for r in got:
        Webhook(secret).verify(r["body"], r["headers"])


def test_a_receiver_that_always_fails_is_given_up_after_max_attempts(store, receivers, deliverers):
    receiver = receivers(default=503)
    deliverers(settings(webhook_max_attempts=3, webhook_backoff_s=0.3))
    job_id = ended_job(store, receiver.url)
    between = wait_for(lambda: outcome_is(store, job_id, "retrying"))
    assert between["next_attempt_at"] is not None and between["last_status"] == 503
    failed = wait_for(lambda: outcome_is(store, job_id, "failed"))
    assert failed["attempts"] == 3 and failed["last_status"] == 503 and failed["last_error"] == "HTTP 503"
    assert failed["next_attempt_at"] is None and failed["delivered_at"] is None
    assert nothing_scheduled(store) and len(receiver.received()) == 3


def test_a_redirect_is_not_followed(store, receivers, deliverers):
    receiver = receivers(default=302)
    deliverers(settings(webhook_max_attempts=2))
    job_id = ended_job(store, receiver.url)
    failed = wait_for(lambda: outcome_is(store, job_id, "failed"))
    assert failed["last_status"] == 302 and "redirect" in failed["last_error"]
    assert [r["path"] for r in receiver.received()] == ["/hook?token=client-secret"] * 2  # never /internal


def test_the_target_is_checked_again_at_delivery_time(store, receivers, deliverers):
    """Admitted once (or resolving differently now): the worker resolves and checks before connecting."""
    receiver = receivers()
    deliverers(settings(webhook_allow="", webhook_max_attempts=1))
    job_id = ended_job(store, receiver.url)
    failed = wait_for(lambda: outcome_is(store, job_id, "failed"))
    assert failed["last_error"].startswith("refused:") and failed["last_status"] is None
    assert "127.0.0.1:" not in failed["last_error"]
    assert receiver.received() == []


def test_a_slow_receiver_times_out(store, receivers, deliverers):
    receiver = receivers(delay_s=1.5)
    deliverers(settings(webhook_timeout_s=0.3, webhook_max_attempts=1))
    job_id = ended_job(store, receiver.url)
    failed = wait_for(lambda: outcome_is(store, job_id, "failed"))
    assert failed["last_error"] == "timed out"


# -- several workers --------------------------------------------------------------------------------------------
def test_two_workers_on_one_outbox_deliver_each_event_once(store, client, receivers, deliverers):
    receiver = receivers(delay_s=0.02)  # slow enough that both threads have work at once
    port = client.connection_pool.connection_kwargs["port"]
    for _ in range(2):  # each "worker" with its own connection, as separate processes have
        own = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        deliverers(settings(), on=JobStore(own, ttl_s=120, events_maxlen=1000))
    job_ids = [ended_job(store, receiver.url) for _ in range(12)]
    wait_for(lambda: all(outcome_is(store, j, "delivered") for j in job_ids))
    assert nothing_scheduled(store)
    ids = sorted(r["headers"]["webhook-id"] for r in receiver.received())
    assert ids == sorted(f"{j}.succeeded" for j in job_ids)  # each once
    assert all(outcome(store, j)["attempts"] == 1 for j in job_ids)


def test_a_delivery_left_by_a_dead_worker_is_delivered_by_another(store, receivers, deliverers):
    receiver = receivers()
    job_id = ended_job(store, receiver.url)
    dead, _ = wh.WebhookQueue(store.r).claim(lease_s=0.5)  # claimed, then the worker "died": never completed
    assert dead is not None and dead.job_id == job_id
    deliverers(settings())
    wait_for(lambda: outcome_is(store, job_id, "delivered"))
    assert len(receiver.received()) == 1 and nothing_scheduled(store)


# -- progress -------------------------------------------------------------------------------------------------------
def running_job(store, url: str, *, progress: bool) -> str:
    job_id = store.create("finetune", {"name": "x"})
    store.claim(job_id, "worker@internal-host", stale_after_s=30, max_attempts=3)
    store.r.hset(job_key(job_id), mapping={"owner": "anonymous", "webhook_url": url,
                                           "webhook_progress": "1" if progress else "0"})
    return job_id


def test_progress_posts_are_rate_limited_signed_and_latest(store, receivers, deliverers, monkeypatch):
    monkeypatch.setattr(webhooks, "NOTE_EVERY_S", 0.05)  # the notes come often: the thread's limit is what's tested
    receiver = receivers()
    deliverers(settings(), progress_every_s=0.4)
    wants = running_job(store, receiver.url, progress=True)
    silent = running_job(store, receiver.url, progress=False)
    step, deadline = 0, time.monotonic() + 15
    while len(receiver.received("job.progress")) < 3 and time.monotonic() < deadline:
        step += 1
        for job_id in (wants, silent):  # what the compute loop does after each step it publishes
            store.r.hset(job_key(job_id), "progress", json.dumps({"step": step, "total": 10_000, "loss": 0.1}))
            webhooks.note_progress(store.r, job_id)
        time.sleep(0.005)  # a step of the "training"
    posts = receiver.received("job.progress")
    assert len(posts) >= 3, "no progress posts"

    secret = KeyStore(store.r).webhook_secret("anonymous")
    payloads = [Webhook(secret).verify(p["body"], p["headers"]) for p in posts]
    assert {p["data"]["id"] for p in payloads} == {wants}  # the job that did not ask gets none
    assert all(p["data"]["state"] == "running" for p in payloads)
    steps = [p["data"]["progress"]["step"] for p in payloads]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and step >= 3 * len(posts)
    assert [p["headers"]["webhook-id"] for p in posts] == [f"{wants}.progress.{s}" for s in steps]
    gaps = [b["at"] - a["at"] for a, b in zip(posts, posts[1:], strict=False)]
    assert min(gaps) >= 0.4 - 0.05, gaps


def test_progress_stops_when_the_job_ends(store, receivers, deliverers):
    receiver = receivers()
    deliverers(settings(), progress_every_s=0.2)
    job_id = running_job(store, receiver.url, progress=True)
    store.r.hset(job_key(job_id), "progress", json.dumps({"step": 1, "total": 2}))
    webhooks.note_progress(store.r, job_id)
    wait_for(lambda: receiver.received("job.progress"))
    store.r.hdel(job_key(job_id), "webhook_url")  # as in ended_job: the push is this test's, wired FINISH or not
    store.finish(job_id, "succeeded", result={})
    store.r.hset(job_key(job_id), "webhook_url", receiver.url)
    store.r.rpush(wh.OUTBOX_KEY, job_id)
    store.r.zadd(wh.PROGRESS_KEY, {job_id: 0})  # a note that raced the end
    wait_for(lambda: outcome_is(store, job_id, "delivered"))
    wait_for(lambda: store.r.zcard(wh.PROGRESS_KEY) == 0)
    assert [json.loads(r["body"])["type"] for r in receiver.received()] == ["job.progress", "job.succeeded"]


def test_note_progress_is_one_command_per_second_and_never_raises(store, monkeypatch):
    monkeypatch.setattr(webhooks, "_notes_paused_until", 0.0)  # restored after: the pause this test causes ends here
    job_id = running_job(store, "http://127.0.0.1:9/", progress=True)
    webhooks.note_progress(store.r, job_id)
    assert store.r.zscore(wh.PROGRESS_KEY, job_id) is not None
    store.r.zrem(wh.PROGRESS_KEY, job_id)
    for _ in range(100):  # within the same second: nothing reaches Redis
        webhooks.note_progress(store.r, job_id)
    assert store.r.zscore(wh.PROGRESS_KEY, job_id) is None

    unreachable = redis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.2, decode_responses=True)
    webhooks.note_progress(unreachable, "another-job")  # logs, does not raise: a step never fails for it
    started = time.monotonic()
    webhooks.note_progress(unreachable, "a-third-job")  # after a failure, notes pause: no step waits on a dead Redis
    assert time.monotonic() - started < 0.1
