"""`minidalle keys create | list | revoke`: API keys of a running service, in its Redis.

    minidalle keys create NAME [--admin] [--requests-per-minute N] [--concurrent-jobs N] [--queued-seconds S]
                               [--disk-bytes B] [--upload-bytes B]       prints the key (once) and its webhook secret
    minidalle keys list [--json]
    minidalle keys revoke ID_OR_NAME

Redis is `--redis-url`, else MINIDALLE_REDIS_URL (what `minidalle serve` prints as `redis`).
"""

from __future__ import annotations

import json

from minidalle.cli.parsing import Parser, float_in, int_in


def keys_main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="minidalle keys", description="Create, list and revoke API keys of a minidalle service.")
    ap.add_argument("--redis-url", default=None, help="the service's Redis (default: MINIDALLE_REDIS_URL)")
    sub = ap.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="make a key; it is printed once, only its hash is stored")
    c.add_argument("name")
    c.add_argument("--admin", action="store_true", help="sees and manages every key's jobs, datasets and adapters")
    c.add_argument("--requests-per-minute", type=int_in(1, 10**6), default=None)
    c.add_argument("--concurrent-jobs", type=int_in(1, 10**6), default=None, help="queued + running")
    c.add_argument("--queued-seconds", type=float_in(0, 10**9, open_low=True), default=None,
                   help="estimated worker-seconds of its queued + running jobs")
    c.add_argument("--disk-bytes", type=int_in(0, None), default=None, help="datasets + adapters it may keep")
    c.add_argument("--upload-bytes", type=int_in(1, None), default=None, help="largest upload")
    ls = sub.add_parser("list", help="every key: id, name, admin, revoked, limits (never the key itself)")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="the key stops working (within seconds); its things stay")
    r.add_argument("key", metavar="ID_OR_NAME")
    args = ap.parse_args(argv)
    store = _store(args.redis_url)
    if args.action == "create":
        from jobs.keys import Limits

        limits = Limits(requests_per_minute=args.requests_per_minute, concurrent_jobs=args.concurrent_jobs,
                        queued_seconds=args.queued_seconds, disk_bytes=args.disk_bytes,
                        upload_bytes=args.upload_bytes)
        token, record = store.create(args.name, admin=args.admin, limits=limits)
        print(f"key:            {token}")
        print(f"id:             {record['id']}  ({'admin' if record['admin'] else 'user'} {record['name']!r})")
        print(f"webhook secret: {store.webhook_secret(record['id'])}")
        print("Keep the key: only its hash is stored, it can't be shown again.")
    elif args.action == "list":
        records = store.list()
        if args.json:
            print(json.dumps(records, indent=2))
        for rec in [] if args.json else records:
            flags = ("admin " if rec["admin"] else "") + ("REVOKED " if rec["revoked"] else "")
            print(f"{rec['id']}  {rec['name']:<24} {flags}{json.dumps(rec['limits']) if rec['limits'] else ''}")
    else:
        rec = store.revoke(args.key)
        print(f"revoked {rec['id']} ({rec['name']!r})")
    return 0


def _store(url: str | None):
    import redis

    from jobs.keys import KeyStore
    from jobs.settings import CommonSettings

    client = redis.Redis.from_url(url or CommonSettings().broker_url, decode_responses=True, socket_timeout=5,
                                  socket_connect_timeout=5)
    return KeyStore(client)
