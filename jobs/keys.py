"""API keys: who a request is, what it may do, how much it may use. Torch-free.

    minidalle:key:{sha256 of the key}   hash: id name admin revoked created_at limits(json) webhook_secret
    minidalle:keys                      hash: key id -> sha256 (listing, revoking by id or name)

Only a hash of a key is stored; the key itself is shown once, when it is created. A request's key is looked up by
its hash (so no stored secret is ever compared byte by byte with attacker input) and the hash read back is
compared in constant time. Every job, dataset and adapter records the id of the key that made it (`owner`).

In open mode (`MINIDALLE_AUTH=open`: `minidalle serve` on a loopback address) a request without a key acts as the
built-in `anonymous` principal, which is an admin: today's single-user behaviour.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from minidalle.errors import InvalidInput

PREFIX = "minidalle:"
KEY_PREFIX = PREFIX + "key:"
INDEX = PREFIX + "keys"
ANONYMOUS_ID = "anonymous"
ANONYMOUS_SECRET = PREFIX + "anonymous:webhook-secret"
TOKEN_PREFIX = "md_"


@dataclass
class Limits:
    """Per-key quotas; None: the service's default (settings `key_*`)."""

    requests_per_minute: int | None = None
    concurrent_jobs: int | None = None  # queued + running
    queued_seconds: float | None = None  # estimated compute seconds of the key's queued + running jobs
    disk_bytes: int | None = None  # datasets + adapters the key owns
    upload_bytes: int | None = None  # one upload

    def merged(self, defaults: Limits) -> Limits:
        return Limits(**{k: v if v is not None else getattr(defaults, k) for k, v in asdict(self).items()})


@dataclass
class Principal:
    """Who is asking: a key (its public id, never the secret), or the anonymous admin of open mode."""

    id: str
    name: str
    admin: bool = False
    limits: Limits = field(default_factory=Limits)

    def owns(self, owner: str | None) -> bool:
        """May see and manage a thing whose owner is `owner` (admins: everything)."""
        return self.admin or owner == self.id

    @property
    def anonymous(self) -> bool:
        return self.id == ANONYMOUS_ID


ANONYMOUS = Principal(ANONYMOUS_ID, "anonymous", admin=True)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + standard base64 of 24 random bytes (what its libraries decode)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _record_key(token_hash: str) -> str:
    return KEY_PREFIX + token_hash


def _principal(raw: dict[str, str]) -> Principal:
    return Principal(raw["id"], raw["name"], raw.get("admin") == "1",
                     Limits(**json.loads(raw.get("limits") or "{}")))


def _checked(raw: dict[str, str], stored_hash: str | None, token_hash: str) -> Principal | None:
    if not raw or raw.get("revoked") == "1" or not hmac.compare_digest(stored_hash or "", token_hash):
        return None
    return _principal(raw)


async def authenticate_async(aredis, token: str) -> Principal | None:
    """`KeyStore.authenticate` over an asyncio client (the API's), so a request never blocks the event loop."""
    token_hash = digest(token)
    raw = await aredis.hgetall(_record_key(token_hash))
    stored = await aredis.hget(INDEX, raw["id"]) if raw.get("id") else None
    return _checked(raw, stored, token_hash)


class KeyStore:
    def __init__(self, client: redis.Redis):
        self.r = client

    def create(self, name: str, *, admin: bool = False, limits: Limits | None = None,
               token: str | None = None) -> tuple[str, dict[str, Any]]:
        """A new key: (the key itself, shown once; its public record)."""
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InvalidInput("name", f"{name!r}: 1-64 letters, digits, '-', '_' or '.'")
        token = token or TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_hash = digest(token)
        key_id = "key_" + secrets.token_hex(6)
        record = {"id": key_id, "name": name, "admin": "1" if admin else "0", "revoked": "0",
                  "created_at": repr(time.time()), "limits": json.dumps(asdict(limits or Limits())),
                  "webhook_secret": new_webhook_secret()}
        p = self.r.pipeline(transaction=True)
        p.hset(_record_key(token_hash), mapping=cast(Any, record))
        p.hset(INDEX, key_id, token_hash)
        p.execute()
        return token, self._public(record)

    def ensure(self, token: str, name: str, *, admin: bool) -> Principal:
        """The key `token` exists (the bootstrap admin key of a deployment, from an env var); created if not."""
        raw = cast(dict[str, str], self.r.hgetall(_record_key(digest(token))))
        if raw and raw.get("revoked") != "1":
            return _principal(raw)
        if raw:  # revoked: a bootstrap key stays revoked; the operator sets a new one
            raise InvalidInput("admin_key", "this key was revoked; set a new MINIDALLE_ADMIN_KEY")
        self.create(name, admin=admin, token=token)
        return self.authenticate(token) or ANONYMOUS

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a presented key; None when unknown or revoked."""
        token_hash = digest(token)
        raw = cast(dict[str, str], self.r.hgetall(_record_key(token_hash)))
        stored = cast(str | None, self.r.hget(INDEX, raw["id"])) if raw.get("id") else None
        return _checked(raw, stored, token_hash)

    def list(self) -> list[dict[str, Any]]:
        hashes = cast(dict[str, str], self.r.hgetall(INDEX))
        p = self.r.pipeline(transaction=False)
        for h in hashes.values():
            p.hgetall(_record_key(h))
        records = [self._public(raw) for raw in p.execute() if raw]
        return sorted(records, key=lambda r: r["created_at"])

    def find(self, id_or_name: str) -> str | None:
        """The hash of the key with this id, or of the only key with this name."""
        hashes = cast(dict[str, str], self.r.hgetall(INDEX))
        if id_or_name in hashes:
            return hashes[id_or_name]
        named = [r["id"] for r in self.list() if r["name"] == id_or_name]
        return hashes[named[0]] if len(named) == 1 else None

    def revoke(self, id_or_name: str) -> dict[str, Any]:
        token_hash = self.find(id_or_name)
        if token_hash is None:
            raise InvalidInput("key", f"no key (or more than one) with id or name {id_or_name!r}")
        self.r.hset(_record_key(token_hash), "revoked", "1")
        return self._public(cast(dict[str, str], self.r.hgetall(_record_key(token_hash))))

    def webhook_secret(self, key_id: str) -> str:
        """The secret a key's webhooks are signed with (Standard Webhooks, `whsec_…`)."""
        if key_id == ANONYMOUS_ID:
            self.r.set(ANONYMOUS_SECRET, new_webhook_secret(), nx=True)
            return cast(str, self.r.get(ANONYMOUS_SECRET))
        token_hash = cast(str | None, self.r.hget(INDEX, key_id))
        secret = cast(str | None, self.r.hget(_record_key(token_hash), "webhook_secret")) if token_hash else None
        if not secret:
            raise KeyError(key_id)
        return secret

    @staticmethod
    def _public(raw: dict[str, str]) -> dict[str, Any]:
        return {"id": raw["id"], "name": raw["name"], "admin": raw.get("admin") == "1",
                "revoked": raw.get("revoked") == "1", "created_at": float(raw.get("created_at") or 0),
                "limits": {k: v for k, v in json.loads(raw.get("limits") or "{}").items() if v is not None}}
