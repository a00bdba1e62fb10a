"""Signed webhooks through the whole service: a job asks for one, the API checks the target, a worker delivers the
final event signed with the key's secret (Standard Webhooks), and the job records the outcome."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from _support.fixtures import wait_job
from _support.servers import Stack
from standardwebhooks import Webhook

from jobs.keys import KeyStore


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("hooks"), workers={"w1": "generate,finetune"}, MINIDALLE_AUTH="keys",
              MINIDALLE_WEBHOOK_ALLOW="127.0.0.1", MINIDALLE_WEBHOOK_BACKOFF_S="0.2")
    yield s
    s.stop()


@pytest.fixture
def receiver():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            got.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            self.send_response(503 if len(got) == 1 else 200)  # the first try fails: it is retried
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()


def _client(stack) -> httpx.Client:
    token, _ = KeyStore(stack.redis).create("hooks")
    return httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_the_final_event_is_delivered_signed_and_recorded(hooked, receiver):
    url, got = receiver
    with _client(hooked) as c:
        secret = c.get("/me").json()["webhook_secret"]
        r = c.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2, "webhook_url": url})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"])
        deadline = time.monotonic() + 30
        while (c.get(f"/jobs/{job['id']}").json().get("webhook") or {}).get("state") != "delivered":
            assert time.monotonic() < deadline, c.get(f"/jobs/{job['id']}").json()
            time.sleep(0.1)
        outcome = c.get(f"/jobs/{job['id']}").json()["webhook"]
    assert outcome["attempts"] == 2 and outcome["last_status"] == 200
    assert len(got) == 2 and got[0]["headers"]["webhook-id"] == got[1]["headers"]["webhook-id"]  # one event, retried
    event = Webhook(secret).verify(got[1]["body"], got[1]["headers"])
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job["id"]
    assert "owner" not in event["data"] and "worker" not in event["data"]


@pytest.mark.parametrize("url, why", [("http://10.1.2.3/hook", "private"), ("ftp://example.org/x", "http"),
                                      ("http://user:pw@127.0.0.1/x", "credentials"),
                                      ("http://169.254.169.254/latest", "")])
def test_unsafe_targets_are_refused_before_anything_is_queued(hooked, url, why):
    with _client(hooked) as c:
        before = len(c.get("/jobs").json()["jobs"])
        r = c.post("/generate", json={"prompt": "x", "num_inference_steps": 2, "webhook_url": url})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-1] == "webhook_url" and why in r.json()["detail"][0]["msg"].lower()
        assert len(c.get("/jobs").json()["jobs"]) == before
