"""The webhook delivery thread every worker process runs, and the compute loop's progress note.

What is scheduled, claimed and recorded, and why delivery is at least once, is `jobs.webhooks` (its docstring is the
design). This module does the sending:

- `start(store, settings, stop)` runs one daemon thread per worker process. Each turn it claims one terminal
  delivery (outbox first, then due retries) or one due progress post, sends it, and records the outcome; with
  nothing to do it blocks on the outbox (a rotating BLMOVE: woken by the next FINISH at once, consuming nothing)
  for at most POLL_S or until the earliest retry is due. Deliveries on one worker are sequential: a slow receiver
  holds that worker's thread for at most about 3 x `webhook_timeout_s`, while the other workers go on.
- `post` is one attempt: resolve the host itself, check every address against the policy (`jobs.webhooks.resolve`),
  then connect to the checked address with the original Host header and TLS server name (SNI, and the certificate is
  verified against that name), so a DNS answer that changes between the check and the connection (rebinding) is
  never used. Redirects are not followed (a redirect is a failed attempt: it could point inside). No proxy from the
  environment is used (it would connect on our behalf, past the check). One fresh connection per attempt: a pooled
  connection is keyed by address, and must not carry another host's request.
- Retries: `webhook_backoff_s` x 2^(attempt-1) (capped at MAX_BACKOFF_S, up to 10 % later at random so receivers
  that come back are not hit by every retry at once) until `webhook_max_attempts`; then the outcome says "failed".
- `note_progress(r, job_id)` is called by the compute loop after each progress publish: at most one Redis command
  per job per NOTE_EVERY_S (rate-limited in this process), and it never raises (after a failure, notes pause for
  NOTE_PAUSE_S: a step never waits on an unreachable Redis for them). The thread then posts the job's
  latest progress at most once per PROGRESS_EVERY_S per job, best-effort (one attempt, nothing recorded).
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import certifi
import httpx
import redis

from jobs import webhooks as wh
from jobs.keys import KeyStore
from jobs.settings import CommonSettings
from jobs.store import TERMINAL, JobStore, decode_job, job_key
from minidalle.errors import InvalidInput

log = logging.getLogger(__name__)
POLL_S = 1.0  # the longest idle wait: how soon a stop, or a progress post that came due, is noticed
NOTE_EVERY_S = 1.0  # note_progress sends at most one command per job this often
NOTE_PAUSE_S = 10.0  # after a note failed (Redis unreachable), none is tried for this long: steps never wait on it
PROGRESS_EVERY_S = 3.0  # job.progress posts per job at most this often
MAX_BACKOFF_S = 3600.0
USER_AGENT = "minidalle-webhooks/1"


# -- one attempt ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    ok: bool
    status: int | None = None  # the HTTP status, when the receiver answered
    error: str | None = None  # short, and never the address or the URL (they are recorded where the client reads)


_tls_lock = threading.Lock()
_tls_context: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    """One verifying TLS context for every attempt (building one loads the CA bundle)."""
    global _tls_context
    with _tls_lock:
        if _tls_context is None:
            _tls_context = ssl.create_default_context(cafile=certifi.where())
        return _tls_context


def _pinned(url: str, allow: str) -> tuple[httpx.URL, str]:
    """(the parsed URL, a checked address of its host) or InvalidInput. The host resolved is the one httpx would
    connect to, and it must be the one the policy parser sees: two parsers disagreeing about a URL's host is how a
    check is bypassed."""
    target = wh.parse_url(url)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidInput(wh.FIELD, "is not a valid URL") from None
    if parsed.host.lower() != target.host.lower():
        raise InvalidInput(wh.FIELD, "has an ambiguous host")
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded, as resolved and as sent in Host / SNI
    addresses = wh.resolve(host, parsed.port or target.port, allow)
    return parsed, addresses[0].split("%", 1)[0]


def post(url: str, body: bytes, headers: dict[str, str], *, allow: str, timeout_s: float) -> Attempt:
    """POST `body` to `url` once, connecting only to an address the policy allows, right after checking it."""
    try:
        parsed, address = _pinned(url, allow)
    except InvalidInput as e:
        return Attempt(False, error=f"refused: {e.message}")
    request_headers = {"host": parsed.netloc.decode("ascii"), "content-type": "application/json",
                       "user-agent": USER_AGENT, **headers}
    extensions = {"sni_hostname": parsed.raw_host.decode("ascii")} if parsed.scheme == "https" else {}
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False, verify=_tls()) as client, \
                client.stream("POST", parsed.copy_with(host=address), content=body, headers=request_headers,
                              extensions=extensions) as response:
            status = response.status_code  # the body is not read: nothing in it is used
    except httpx.TimeoutException:
        return Attempt(False, error="timed out")
    except httpx.ConnectError:
        return Attempt(False, error="could not connect")
    except (httpx.HTTPError, OSError) as e:
        return Attempt(False, error=f"request failed ({type(e).__name__})")
    if 200 <= status < 300:
        return Attempt(True, status)
    if 300 <= status < 400:
        return Attempt(False, status, f"redirect ({status}) not followed")
    return Attempt(False, status, f"HTTP {status}")


def backoff_s(settings: CommonSettings, attempts: int) -> float:
    """The wait after the attempts-th failed attempt."""
    delay = min(MAX_BACKOFF_S, settings.webhook_backoff_s * 2 ** (attempts - 1))
    return delay * (1 + 0.1 * random.random())


# -- the delivery thread ----------------------------------------------------------------------------------------
class Deliverer:
    """One worker's share of the deliveries; `step` does one piece of work (the thread calls it in a loop)."""

    def __init__(self, store: JobStore, settings: CommonSettings, *, progress_every_s: float = PROGRESS_EVERY_S,
                 lease_s: float | None = None):
        self.r = store.r
        self.settings = settings
        self.queue = wh.WebhookQueue(store.r)
        self.keys = KeyStore(store.r)
        self.progress_every_s = progress_every_s
        # longer than one attempt can take (connect, send, wait for the status: each bounded by the timeout)
        self.lease_s = lease_s if lease_s is not None else 3 * settings.webhook_timeout_s + 30

    def step(self) -> float:
        """0 after doing something (call again at once), else how long nothing is due (at most POLL_S)."""
        claimed, retry_wait = self.queue.claim(self.lease_s)
        if claimed is not None:
            self.deliver(claimed)
            return 0.0
        job_id, progress_wait = self.queue.take_progress(self.progress_every_s)
        if job_id is not None:
            self.post_progress(job_id)
            return 0.0
        return min(w for w in (retry_wait, progress_wait, POLL_S) if w is not None)

    def wait(self, seconds: float) -> None:
        """Block until the outbox has something, or `seconds` pass. BLMOVE from the list's tail to its own tail
        changes nothing: it only wakes on a push, which the next `claim` then takes atomically."""
        self.r.blmove(wh.OUTBOX_KEY, wh.OUTBOX_KEY, cast(int, max(0.01, seconds)), "RIGHT", "RIGHT")

    def _secret(self, raw: dict[str, str]) -> str | None:
        """The signing secret of the job's key; None when the key is gone or its secret unusable."""
        try:
            secret = self.keys.webhook_secret(raw.get("owner") or "")
        except KeyError:
            return None
        return secret if wh.usable_secret(secret) else None

    def deliver(self, claimed: wh.Claimed) -> None:
        """One attempt at a terminal event, and its outcome: delivered, retrying (rescheduled) or failed."""
        raw = cast(dict[str, str], self.r.hgetall(job_key(claimed.job_id)))
        url = raw.get("webhook_url")
        previous = _outcome(raw)
        # expired, never asked for, or already settled (a second push of the same id): nothing to send
        if not raw or not url or raw.get("state") not in TERMINAL or previous.get("state") in ("delivered", "failed"):
            self.queue.complete(claimed, None, retry_in_s=None)
            return
        attempts = int(previous.get("attempts") or 0) + 1
        outcome: dict[str, Any] = {"url_host": wh.url_host(url), "attempts": attempts, "state": "failed",
                                   "last_status": None, "last_error": None, "delivered_at": None,
                                   "next_attempt_at": None}
        secret = self._secret(raw)
        if secret is None:  # nothing to sign with, and retrying will not bring it back
            outcome["last_error"] = "no usable signing secret for the job's key"
            self.queue.complete(claimed, outcome, retry_in_s=None)
            return
        attempt = self._attempt(raw, url, secret, claimed.now)
        outcome.update(last_status=attempt.status, last_error=attempt.error)
        retry_in = None
        if attempt.ok:
            outcome["state"] = "delivered"
        elif attempts < self.settings.webhook_max_attempts:
            outcome["state"], retry_in = "retrying", backoff_s(self.settings, attempts)
        log.info("webhook of job %s to %s: attempt %d %s (%s)", claimed.job_id, outcome["url_host"], attempts,
                 outcome["state"], attempt.error or attempt.status)
        if not self.queue.complete(claimed, outcome, retry_in_s=retry_in):
            log.warning("webhook of job %s: lease lost during the attempt (another worker retries it)",
                        claimed.job_id)

    def _attempt(self, raw: dict[str, str], url: str, secret: str, claimed_at: float) -> Attempt:
        """Build, sign and send the terminal event. An unexpected error is a failed attempt like any other, so a
        record that trips a bug is retried a bounded number of times, not re-leased forever."""
        try:
            job = decode_job(raw)
            state = job["state"]
            body = wh.body_bytes(wh.event(wh.EVENT_TYPES[state], job, job["finished_at"] or claimed_at))
            headers = wh.sign(secret, wh.message_id(job["id"], state), body, time.time())
            return post(url, body, headers, allow=self.settings.webhook_allow,
                        timeout_s=self.settings.webhook_timeout_s)
        except Exception as e:  # recorded as the attempt's error, logged with its traceback
            log.exception("webhook of job %s: could not attempt", raw.get("id"))
            return Attempt(False, error=f"internal error ({type(e).__name__})")

    def post_progress(self, job_id: str) -> None:
        """A job.progress post: the job's latest progress, one attempt, best-effort."""
        raw = cast(dict[str, str], self.r.hgetall(job_key(job_id)))
        url = raw.get("webhook_url")
        if not url or raw.get("state") != "running" or raw.get("webhook_progress") != "1":
            return
        secret = self._secret(raw)
        if secret is None:
            return
        job, now = decode_job(raw), time.time()
        if job["progress"] is None:  # noted before its first progress batch reached the record: the next note posts
            return
        body = wh.body_bytes(wh.event("job.progress", job, now))
        headers = wh.sign(secret, wh.progress_message_id(job_id, job["progress"], now), body, now)
        attempt = post(url, body, headers, allow=self.settings.webhook_allow,
                       timeout_s=self.settings.webhook_timeout_s)
        if not attempt.ok:
            log.info("progress webhook of job %s to %s failed (%s)", job_id, wh.url_host(url),
                     attempt.error or attempt.status)


def _outcome(raw: dict[str, str]) -> dict:
    try:
        value = json.loads(raw.get("webhook") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _run(deliverer: Deliverer, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            wait = deliverer.step()
            if wait > 0 and not stop.is_set():
                deliverer.wait(wait)
        except Exception:  # Redis unreachable, a bug in one delivery: the thread must outlive it
            log.warning("webhook delivery failed; retrying in %.0f s", POLL_S, exc_info=True)
            stop.wait(POLL_S)


def start(store: JobStore, settings: CommonSettings, stop: threading.Event, *, name: str = "webhooks",
          progress_every_s: float = PROGRESS_EVERY_S, lease_s: float | None = None) -> threading.Thread:
    """Start this process's delivery thread (daemon); it ends within about POLL_S (or one attempt) of `stop`."""
    deliverer = Deliverer(store, settings, progress_every_s=progress_every_s, lease_s=lease_s)
    thread = threading.Thread(target=_run, args=(deliverer, stop), name=name, daemon=True)
    thread.start()
    return thread


# -- the compute loop's note ----------------------------------------------------------------------------------------
_noted: dict[str, float] = {}  # job id -> when this process last sent its note (monotonic)
_noted_lock = threading.Lock()
_notes_paused_until = 0.0  # monotonic
_queues: dict[int, tuple[redis.Redis, wh.WebhookQueue]] = {}  # by client: its registered scripts


def _due(job_id: str) -> bool:
    now = time.monotonic()
    with _noted_lock:
        last = _noted.get(job_id)
        if last is not None and now - last < NOTE_EVERY_S:
            return False
        _noted[job_id] = now
        if len(_noted) > 256:  # entries older than NOTE_EVERY_S limit nothing any more
            for old in [k for k, t in _noted.items() if now - t >= NOTE_EVERY_S]:
                del _noted[old]
        return True


def _queue_for(r: redis.Redis) -> wh.WebhookQueue:
    entry = _queues.get(id(r))
    if entry is None or entry[0] is not r:
        if len(_queues) > 8:
            _queues.clear()
        entry = _queues[id(r)] = (r, wh.WebhookQueue(r))  # the client is kept: its id is not reused
    return entry[1]


def note_progress(r: redis.Redis, job_id: str) -> None:
    """The job published progress: let the delivery threads post it (if the job asked for progress webhooks).
    Cheap (at most one script call per job per NOTE_EVERY_S, none in between) and never raises."""
    global _notes_paused_until
    try:
        if time.monotonic() < _notes_paused_until or not _due(job_id):
            return
        _queue_for(r).note_progress(job_id)
    except Exception:  # best-effort: a progress webhook is never worth failing, or stalling, a step
        _notes_paused_until = time.monotonic() + NOTE_PAUSE_S
        log.debug("progress note for %s failed; notes paused for %.0f s", job_id, NOTE_PAUSE_S, exc_info=True)
