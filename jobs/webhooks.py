"""Signed webhooks: the target policy, the event a client receives, and the delivery schedule in Redis. Torch-free
(the API checks targets at admission; the workers' `worker.webhooks` delivers).

    minidalle:webhooks:outbox    list: job ids whose terminal event is to be delivered. FINISH / CANCEL (`jobs.lua`)
                                 RPUSH the id, atomically with the terminal state, when the job has `webhook_url`
    minidalle:webhooks:retry     zset: job id -> when it may next be taken (Redis time, seconds). Holds every
                                 terminal delivery that left the outbox until it is delivered or given up
    minidalle:webhooks:progress  zset: job id -> when its next `job.progress` post is due (best-effort)
    minidalle:job:{id}           hash: the job (`jobs.store`); this module reads `owner`, `webhook_url`,
                                 `webhook_progress`, and writes `webhook` (the outcome, JSON) and `webhook_progress_at`

Delivery is at least once, like the jobs themselves:

- *Claim.* One Lua script (`CLAIM`) takes the next job id: from the outbox first, else the earliest entry of the
  retry zset that is due. Taking it and giving it a *lease* (its score becomes now + lease) is one atomic step, so
  several workers share the outbox and each delivery has one owner. Nothing leaves Redis before it is leased: a
  worker that dies mid-delivery loses nothing; its lease runs out and the entry is simply due again for any worker.
- *Complete.* `COMPLETE` removes the entry (delivered, or given up after `webhook_max_attempts`) or sets its score to
  the next attempt's time (exponential backoff: `webhook_backoff_s` doubling), and records the outcome in the job's
  `webhook` field, in one step. It only acts while the caller still holds its lease (the score is still the lease
  it was given: a fencing token), so a worker that outlived its lease cannot overwrite the new owner's schedule.
- *Duplicates.* An id whose outcome is already settled (delivered or failed) is dropped when claimed, so the same
  id pushed twice is not sent twice. The outbox is served before due retries (new events are not held up behind a
  receiver that keeps failing).
- *Ids.* The Standard Webhooks `webhook-id` of a terminal event is `{job_id}.{state}`: the same on every retry and
  every re-delivery, so a receiver dedupes with it. A progress event's is `{job_id}.progress.{step}`.

Progress (`webhook_progress: true`) is best-effort and never retried. The compute loop's `note` (one script call,
rate-limited in-process by `worker.webhooks.note_progress`) puts the job in the progress zset with score 0 unless
it is there already; `TAKE_PROGRESS` hands a due entry to one worker, at most once per `every_s` per job (the last
post time is the job's `webhook_progress_at`: the cooldown holds across workers), and only while the job runs. A
post reads the job's progress at send time, so a post is always the latest progress.

All times in the schedule come from Redis' `TIME`, as in `jobs.lua`: no two machines' clocks need to agree.

The target policy (`check_url`) refuses URLs that are not http(s), carry credentials or have no host, and any target
whose resolved addresses include one that is not a public unicast address (private, loopback, link-local, multicast,
reserved, unspecified, shared/CGNAT; IPv4-mapped, 6to4 and NAT64 forms are unwrapped first) unless `allow` (the
`webhook_allow` setting: host names, IPs, CIDRs) lets it. The API checks at admission; the worker checks again right
before each attempt, after its own resolution, and connects to the address it checked (against DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from minidalle.errors import InvalidInput

PREFIX = "minidalle:webhooks:"
OUTBOX_KEY = PREFIX + "outbox"
RETRY_KEY = PREFIX + "retry"
PROGRESS_KEY = PREFIX + "progress"
FIELD = "webhook_url"  # the request field every policy error names
MAX_URL_LENGTH = 2048
EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
# What a receiver sees of a job: what GET /jobs/{id} shows, without who ran it (worker, heartbeat), whose it is
# (owner) or what was asked (request: prompts and dataset ids belong in the client's own records).
PUBLIC_FIELDS = ("id", "kind", "state", "created_at", "started_at", "finished_at", "progress", "result", "error")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


# -- the target policy -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A parsed webhook URL: what is resolved and checked."""

    scheme: str
    host: str  # lower case; IPv6 without brackets
    port: int


def parse_url(url: str) -> Target:
    """The URL's scheme, host and port, or InvalidInput naming `webhook_url` (no resolution)."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(FIELD, "must be an http or https URL")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(FIELD, f"longer than {MAX_URL_LENGTH} characters")
    # whitespace, control characters and backslashes are where URL parsers disagree about the host
    if any(c <= " " or c == "\x7f" or c == "\\" for c in url):
        raise InvalidInput(FIELD, "must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise InvalidInput(FIELD, "is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidInput(FIELD, f"must be an http or https URL, not {scheme or 'a relative one'!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(FIELD, "must not carry credentials (user:password@)")
    host = parts.hostname
    if not host:
        raise InvalidInput(FIELD, "has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise InvalidInput(FIELD, "has an invalid port") from None
    return Target(scheme, host, port)


def _unwrapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 form carries (mapped ::ffff:a.b.c.d, 6to4 2002::/16, NAT64 64:ff9b::/96), else ip:
    what the packets would really reach."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public(ip: IPAddress) -> bool:
    """A public unicast address. `is_global` alone misses multicast (part of 224/4 counts as global)."""
    ip = _unwrapped(ip)
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def parse_allow(allow: str) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """`webhook_allow` ("a.example, 127.0.0.1, 10.0.0.0/8") as (host names, networks). An entry that is neither an
    address nor a network is a host name."""
    names, networks = set(), []
    for entry in (e.strip() for e in (allow or "").split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return frozenset(names), tuple(networks)


def _allowed(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    candidates = {ip, _unwrapped(ip)}
    return any(c.version == n.version and c in n for c in candidates for n in networks)


def resolve(host: str, port: int, allow: str) -> list[str]:
    """The addresses `host` resolves to (one getaddrinfo), each checked against the policy: every one must be
    public or allowed (one private address among public ones is enough for a rebinding attack). InvalidInput
    names `webhook_url`; messages never show the addresses (they are the deployment's view of the network)."""
    names, networks = parse_allow(allow)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):  # gaierror is an OSError; a malformed IDNA name is a UnicodeError
        raise InvalidInput(FIELD, f"host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise InvalidInput(FIELD, f"host {host!r} does not resolve")
    if host.lower().rstrip(".") in names:
        return addresses
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
        if not is_public(ip) and not _allowed(ip, networks):
            raise InvalidInput(FIELD, f"host {host!r} is (or resolves to) a private, loopback, link-local, "
                                      "multicast or reserved address; set MINIDALLE_WEBHOOK_ALLOW to permit it")
    return addresses


def check_url(url: str, allow: str) -> None:
    """Admission check of a client's `webhook_url` (the API, before anything is queued): InvalidInput naming the
    field when refused. The worker repeats the resolution and the check before each attempt."""
    target = parse_url(url)
    resolve(target.host, target.port, allow)


def url_host(url: str) -> str:
    """The host alone, for the recorded outcome (never the path or query: they may carry the client's tokens)."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


# -- the event ------------------------------------------------------------------------------------------------------
def public_view(job: dict) -> dict:
    """The job as a receiver sees it (`job` is `jobs.store.decode_job` output)."""
    return {name: job.get(name) for name in PUBLIC_FIELDS}


def iso_utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(event_type: str, job: dict, at: float) -> dict:
    """The JSON body: {type, timestamp, data}. A terminal event's timestamp is the job's end, so its body is the same
    on every retry (only the signature headers, which carry the attempt's time, change)."""
    return {"type": event_type, "timestamp": iso_utc(at), "data": public_view(job)}


def body_bytes(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def message_id(job_id: str, state: str) -> str:
    """The terminal event's webhook-id: stable across retries and re-deliveries."""
    return f"{job_id}.{state}"


def progress_message_id(job_id: str, progress: Any, at: float) -> str:
    step = progress.get("step") if isinstance(progress, dict) else None
    return f"{job_id}.progress.{step}" if isinstance(step, int) else f"{job_id}.progress.t{int(at * 1000)}"


def usable_secret(secret: str) -> bool:
    """A secret the `standardwebhooks` libraries can read ("whsec_" + standard base64): one they cannot read would
    fail on the receiver's side too, so nothing is sent with it."""
    try:
        Webhook(secret)
    except (ValueError, RuntimeError, EmptyWebhookSecretError):  # binascii.Error is a ValueError
        return False
    return True


def sign(secret: str, msg_id: str, body: bytes, at: float) -> dict[str, str]:
    """Standard Webhooks headers for one attempt (`at`: the attempt's time; receivers refuse stale timestamps)."""
    timestamp = datetime.fromtimestamp(int(at), tz=timezone.utc)
    signature = Webhook(secret).sign(msg_id, timestamp, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)), "webhook-signature": signature}


# -- the schedule (Lua) ---------------------------------------------------------------------------------------------
_NOW = "local _t = redis.call('TIME'); local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000\n"

# KEYS: outbox, retry; ARGV: lease_s. Returns {job_id, lease, now} for a claim, else {'', wait_s} where wait_s
# ('' when nothing is scheduled) is how long until the earliest entry is due. Scores travel as strings: a Lua number
# returned to Redis would be truncated to an integer.
CLAIM = _NOW + """
local id = redis.call('LPOP', KEYS[1])
if not id then
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', tostring(now), 'LIMIT', 0, 1)
  id = due[1]
end
if not id then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if first[2] then return {'', tostring(math.max(0, tonumber(first[2]) - now))} end
  return {'', ''}
end
local lease = tostring(now + tonumber(ARGV[1]))
redis.call('ZADD', KEYS[2], lease, id)
return {id, lease, tostring(now)}
"""

# KEYS: retry, job; ARGV: job_id, lease, outcome_json ('' = record nothing), delay_s ('' = done: remove the entry).
# Fills the outcome's times from Redis' clock: delivered_at (state "delivered") and next_attempt_at (a retry).
# 0 when the lease was lost (the entry is another worker's now, or gone), else 1.
COMPLETE = _NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
local next_at = nil
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  next_at = now + tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], tostring(next_at), ARGV[1])
end
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  local outcome = cjson.decode(ARGV[3])
  if outcome.state == 'delivered' then outcome.delivered_at = now end
  outcome.next_attempt_at = next_at or cjson.null
  redis.call('HSET', KEYS[2], 'webhook', cjson.encode(outcome))
end
return 1
"""

# KEYS: job, progress; ARGV: job_id. The compute loop's note: the job has progress to post (if it asked for it).
NOTE = """
if redis.call('HGET', KEYS[1], 'webhook_progress') ~= '1' then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
return redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[1])
"""

# KEYS: progress, job; ARGV: job_id, every_s. Take a due progress entry: 'post' (this caller posts now; the cooldown
# starts), 'later' (posted less than every_s ago: due again when the cooldown ends), 'drop' (the job no longer runs
# or wants progress), 'gone' (another worker took it first).
TAKE_PROGRESS = _NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > now then return 'gone' end
local f = redis.call('HMGET', KEYS[2], 'state', 'webhook_progress', 'webhook_url', 'webhook_progress_at')
if f[1] ~= 'running' or f[2] ~= '1' or not f[3] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 'drop'
end
local last = tonumber(f[4] or '0')
if now - last < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], tostring(last + tonumber(ARGV[2])), ARGV[1])
  return 'later'
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'webhook_progress_at', tostring(now))
return 'post'
"""


@dataclass(frozen=True)
class Claimed:
    """A terminal delivery this caller holds until `lease` (Redis time); `now` is Redis' time at the claim."""

    job_id: str
    lease: str
    now: float


def _job_key(job_id: str) -> str:
    return f"minidalle:job:{job_id}"  # = jobs.store.job_key; not imported, so jobs.store may import OUTBOX_KEY


class WebhookQueue:
    """The delivery schedule over one synchronous Redis client (decode_responses=True)."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._claim = client.register_script(CLAIM)
        self._complete = client.register_script(COMPLETE)
        self._note = client.register_script(NOTE)
        self._take_progress = client.register_script(TAKE_PROGRESS)

    def claim(self, lease_s: float) -> tuple[Claimed | None, float | None]:
        """(the next delivery, leased for lease_s) or (None, seconds until the earliest retry is due, or None)."""
        reply = cast(list[str], self._claim(keys=[OUTBOX_KEY, RETRY_KEY], args=[lease_s]))
        if reply[0]:
            return Claimed(reply[0], reply[1], float(reply[2])), None
        return None, float(reply[1]) if reply[1] else None

    def complete(self, claimed: Claimed, outcome: dict | None, *, retry_in_s: float | None) -> bool:
        """Done with it (retry_in_s None) or try again in retry_in_s; record the outcome. False: the lease was lost."""
        args = [claimed.job_id, claimed.lease, json.dumps(outcome) if outcome is not None else "",
                "" if retry_in_s is None else repr(float(retry_in_s))]
        return bool(self._complete(keys=[RETRY_KEY, _job_key(claimed.job_id)], args=args))

    def note_progress(self, job_id: str) -> None:
        """One script call: the job has new progress (ignored unless it runs and asked for progress webhooks)."""
        self._note(keys=[_job_key(job_id), PROGRESS_KEY], args=[job_id])

    def take_progress(self, every_s: float) -> tuple[str | None, float | None]:
        """(a job whose progress this caller posts now, None) or (None, seconds until the next entry is due)."""
        while True:
            due = cast(list[tuple[str, float]], self.r.zrange(PROGRESS_KEY, 0, 0, withscores=True))
            if not due:
                return None, None
            job_id, score = due[0]
            outcome = self._take_progress(keys=[PROGRESS_KEY, _job_key(job_id)], args=[job_id, every_s])
            if outcome == "post":
                return job_id, None
            if outcome == "gone" and score > 0:  # not due yet (or taken): report the wait instead of spinning
                now = _redis_now(self.r)
                if score > now:
                    return None, score - now
            # 'drop', 'later', or taken by another worker: look at the next entry


def _redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1_000_000
