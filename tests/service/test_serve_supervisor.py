"""`minidalle serve` as a supervisor: a child that dies is started again (with backoff), the job a killed worker ran
still ends once, /readyz notices a dead worker at once, and the auth mode follows the bind address.

The process tests run the real thing (the `serve` subprocess, redis-server, a Celery worker, uvicorn, HTTP) and
wait for conditions with deadlines; every process a test started is killed at its end, even when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from _support.fixtures import shapes_dataset_zip, sse_events
from _support.servers import REPO, pids_where

from jobs import presence
from jobs.store import TERMINAL, done_key, events_key
from service import serve

SERVE = "import sys; from service.serve import serve_main; sys.exit(serve_main(sys.argv[1:]))"
ADMIN_KEY = "test-admin-key-0123456789abcdef"




def _environ(pid: int | str) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def _cmdline(pid: int | str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """`predicate()`'s first truthy value; AssertionError naming `what` (and the last error) past the deadline."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except Exception as e:  # noqa: BLE001 - not there yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


class Serve:
    """The real `minidalle serve` in its own session; its output lines, URLs and children."""

    def __init__(self, root: Path, *args: str, **env: str):
        self.data = (root / "data").resolve()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MINIDALLE_")}  # no MINIDALLE_REDIS_URL
        # fast heartbeats (a killed worker's job is re-enqueued in seconds), one torch thread on the shared cores
        base_env.update(MINIDALLE_TORCH_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                        MINIDALLE_HEARTBEAT_INTERVAL_S="0.5", MINIDALLE_STALE_AFTER_S="3",
                        MINIDALLE_RECONCILE_INTERVAL_S="0.5", **env)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, "--port", "0", "--data-dir", str(self.data),
                                      "--log-level", "warning", *args], cwd=REPO, env=base_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.base = self.redis_url = ""
        self.headers = {"Authorization": f"Bearer {env['MINIDALLE_ADMIN_KEY']}"} if "MINIDALLE_ADMIN_KEY" in env \
            else {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float = 60) -> str:
        """The first output line containing `text` (serve's own lines are `[minidalle serve] ...`)."""
        def found():
            if self.proc.poll() is not None and not self.reader.is_alive():
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            return next((line for line in self.lines if text in line), None)
        try:
            return wait_until(found, timeout, repr(text))
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.output()}") from None

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_line("[minidalle serve] ready:", timeout)
        self.base = next(line.split()[-1] for line in self.lines if line.startswith("[minidalle serve] API"))
        line = next(line for line in self.lines if line.startswith("[minidalle serve] redis "))
        self.redis_url = line.split()[3]
        self.http = httpx.Client(base_url=self.base, headers=self.headers, timeout=60)
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    def children(self) -> list[int]:
        """The workers' and the API's pids (they inherit MINIDALLE_DATA_DIR; redis gets no MINIDALLE_ env)."""
        needle = f"MINIDALLE_DATA_DIR={self.data}".encode()
        return pids_where(lambda pid: needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))

    def child(self, word: str) -> int:
        """The one child whose command line has `word` (uvicorn, celery)."""
        [pid] = [pid for pid in self.children() if word in _cmdline(pid)]
        return pid

    def redispids_where(self) -> list[int]:
        """redis-server chdirs to its --dir (data/redis) and rewrites its command line."""
        return pids_where(lambda pid: os.readlink(f"/proc/{pid}/cwd") == str(self.data / "redis"))

    def worker_presence(self) -> list[dict]:
        return presence.workers(self.redis)

    def ready_worker_pid(self) -> int | None:
        return next((w["pid"] for w in self.worker_presence() if w.get("state") == "ready"), None)

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in set(self.children()) | set(pids_where(lambda p: os.readlink(f"/proc/{p}/cwd").startswith(
                str(self.data)))):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for attr in ("http", "redis"):
            if hasattr(self, attr):
                getattr(self, attr).close()


@pytest.fixture
def start_serve(tmp_path, request):
    """`start_serve(*args, **env)` → a started Serve (not yet ready); all it left running is killed afterwards."""
    started: list[Serve] = []

    def start(*args: str, **env: str) -> Serve:
        s = Serve(tmp_path / f"serve{len(started)}", *args, **env)
        started.append(s)
        return s

    yield start
    for s in started:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"---- serve output ----\n{s.output()}")
        s.cleanup()


def _assert_stops_cleanly(s: Serve) -> None:
    assert s.stop() == 0, s.output()
    assert s.lines[-1] == "[minidalle serve] stopped", s.output()
    wait_until(lambda: not s.children() and not s.redispids_where(), 10, "every child gone")


def _terminal_events(s: Serve, job_id: str) -> list[str]:
    """The job's terminal events as Redis holds them (the SSE stream stops at the first one)."""
    return [f["type"] for _id, f in s.redis.xrange(events_key(job_id)) if f["type"] in TERMINAL]


# ---- a killed worker -----------------------------------------------------------------------------------------------

def test_serve_restarts_a_killed_worker_readyz_follows_and_its_finetune_ends_once(start_serve):
    # A long presence TTL (30 s): /readyz can only turn 503 within 2 s because serve removed the dead worker's key.
    s = start_serve(MINIDALLE_PRESENCE_INTERVAL_S="10")
    s.wait_ready()
    assert s.http.get("/readyz").status_code == 200
    up = s.http.post("/datasets", files={"file": ("shapes.zip", shapes_dataset_zip(2), "application/zip")})
    assert up.status_code == 201, up.text
    r = s.http.post("/finetune", json={"name": "survivor", "dataset_id": up.json()["dataset_id"], "steps": 150,
                                       "checkpoint_every": 10, "seed": 1})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    wait_until(lambda: (s.http.get(f"/jobs/{job_id}").json().get("progress") or {}).get("step", 0) >= 12, 60,
               "the fine-tune past its first checkpoint")
    worker = s.ready_worker_pid()
    assert worker in s.children() and "celery" in _cmdline(worker)

    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: s.http.get("/readyz").status_code == 503, 5, "/readyz 503")
    assert time.monotonic() - killed_at < 2.5, "serve did not drop the dead worker's presence at once"
    assert all(w["pid"] != worker for w in s.worker_presence())
    s.wait_line("[minidalle serve] worker1 exited with status -9; restarting in 1.0s (restart 1)", 10)
    wait_until(lambda: s.http.get("/readyz").status_code == 200, 60, "/readyz 200 after the restart")
    assert s.ready_worker_pid() not in (None, worker)

    events = sse_events(s.http, f"/jobs/{job_id}/events", timeout=120)
    kinds = [e[0] for e in events]
    assert [k for k in kinds if k in TERMINAL] == ["succeeded"], kinds
    assert [e[2]["attempt"] for e in events if e[0] == "started"] == [1, 2], kinds  # caught running, resumed
    job = s.http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["attempts"] == 2, job
    assert job["progress"]["step"] == 150
    assert _terminal_events(s, job_id) == ["succeeded"]
    assert s.proc.poll() is None and s.http.get("/healthz").status_code == 200
    port = s.base.rsplit(":", 1)[1]  # loopback, no admin key: open, and said so before anything started
    banner = (f"[minidalle serve] WARNING: open mode — no API keys; anyone who can reach 127.0.0.1:{port} has full "
              "access.")
    assert s.lines.index(banner) < s.lines.index(f"[minidalle serve] API   {s.base}"), s.output()
    assert {_environ(pid)["MINIDALLE_AUTH"] for pid in s.children()} == {"open"}
    _assert_stops_cleanly(s)


# ---- a killed Redis ------------------------------------------------------------------------------------------------

def _in_append_only_file(folder: Path, text: str) -> bool:
    """`text` written to Redis's AOF (in the kernel's hands: a kill -9 of redis-server cannot lose it)."""
    files = [folder / "appendonly.aof", *sorted((folder / "appendonlydir").glob("*"))]
    return any(text.encode() in f.read_bytes() for f in files if f.is_file())


def _final_state(s: Serve, job_id: str, timeout: float = 60) -> str:
    def ended():
        r = s.http.get(f"/jobs/{job_id}")
        return r.status_code == 200 and r.json()["state"] in TERMINAL and r.json()["state"]
    return wait_until(ended, timeout, f"job {job_id} to end", interval=0.2)


def test_serve_restarts_a_killed_redis_on_its_port_with_its_data(start_serve):
    s = start_serve(MINIDALLE_ADMIN_KEY=ADMIN_KEY)  # keys mode: every request carries the admin key
    s.wait_ready()
    r = s.http.post("/generate?wait=60", json={"prompt": "a red circle", "num_inference_steps": 2})
    assert r.status_code == 200 and r.json()["job"]["state"] == "succeeded", r.text
    job_id = r.json()["job_id"]
    # its final state went out with its `done` key (one script): once that is in the file, all of the job is
    wait_until(lambda: _in_append_only_file(s.data / "redis", done_key(job_id)), 10, "the job in the AOF")
    [old] = s.redispids_where()

    os.kill(old, signal.SIGKILL)
    s.wait_line("[minidalle serve] redis exited with status -9; restarting in 1.0s (restart 1)", 10)
    wait_until(lambda: s.redis.ping() and s.redispids_where() not in ([], [old]), 30, "redis back on the same URL")
    assert s.redis_url.startswith("redis://127.0.0.1:")

    got = wait_until(lambda: (g := s.http.get(f"/jobs/{job_id}")).status_code == 200 and g.json(), 30,
                     "GET /jobs/{id} through the new redis")
    assert got["state"] == "succeeded", got
    wait_until(lambda: s.http.get("/readyz").status_code == 200, 60, "/readyz 200 with the new redis")
    # The API's first use of a pooled connection to the old server fails (`?wait` then answers 202, as it does
    # whenever waiting fails): what counts is that the job gets done.
    r = s.http.post("/generate?wait=60", json={"prompt": "a blue square", "num_inference_steps": 2})
    assert r.status_code in (200, 202), r.text
    assert _final_state(s, r.json()["job_id"]) == "succeeded"
    assert s.proc.poll() is None
    assert not any("WARNING: open mode" in line for line in s.lines)
    assert "[minidalle serve] auth  keys: requests need `Authorization: Bearer <key>`" in s.lines
    assert {_environ(pid)["MINIDALLE_AUTH"] for pid in s.children()} == {"keys"}
    _assert_stops_cleanly(s)


# ---- a killed API, a worker's clean exit, the backoff --------------------------------------------------------------

def _answers(url: str) -> bool:
    """Any HTTP answer (in keys mode without a key a route may say 401: the process is up all the same)."""
    return httpx.get(url, timeout=2).status_code > 0


def _api_pid(s: Serve) -> int | None:
    pids = [pid for pid in s.children() if "uvicorn" in _cmdline(pid)]
    return pids[0] if len(pids) == 1 else None


def test_serve_restarts_the_api_with_backoff_and_a_worker_that_exited_cleanly(start_serve):
    s = start_serve("--auth", "keys")  # no MINIDALLE_ADMIN_KEY: allowed on loopback (keys may be in Redis)
    s.wait_ready()
    api = _api_pid(s)
    os.kill(api, signal.SIGKILL)
    s.wait_line("[minidalle serve] api exited with status -9; restarting in 1.0s (restart 1)", 10)
    second = wait_until(lambda: (pid := _api_pid(s)) not in (None, api) and _answers(s.base + "/healthz") and pid,
                        60, "the API back on its port")
    os.kill(second, signal.SIGKILL)  # again, within a minute: the backoff doubles
    s.wait_line("[minidalle serve] api exited with status -9; restarting in 2.0s (restart 2)", 10)
    wait_until(lambda: _answers(s.base + "/healthz"), 60, "the API back again")

    worker = s.child("celery")
    os.kill(worker, signal.SIGTERM)  # a warm shutdown: exit status 0, and still restarted
    s.wait_line("[minidalle serve] worker1 exited with status 0; restarting in 1.0s (restart 1)", 30)
    wait_until(lambda: s.ready_worker_pid() not in (None, worker), 60, "a new worker ready")
    assert not any("WARNING: open mode" in line for line in s.lines)
    assert {_environ(pid)["MINIDALLE_AUTH"] for pid in s.children()} == {"keys"}
    _assert_stops_cleanly(s)


# ---- auth modes ----------------------------------------------------------------------------------------------------

def test_serve_refuses_a_public_host_without_an_admin_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIDALLE_")}
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-c", SERVE, "--host", "0.0.0.0", "--data-dir", str(data)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr == ("minidalle: error: --host 0.0.0.0 is not a loopback address: set MINIDALLE_ADMIN_KEY (keys "
                        "are required) or pass --insecure to run open\n"), r.stderr
    assert r.stdout == "" and not data.exists()  # nothing was started


def test_serve_insecure_on_a_public_host_runs_open_with_a_loud_warning(start_serve):
    s = start_serve("--host", "0.0.0.0", "--insecure")
    s.wait_line("[minidalle serve] WARNING: Set MINIDALLE_ADMIN_KEY (or --auth keys) to require keys.", 60)
    # stopped while it starts: nothing more is started, everything goes
    _assert_stops_cleanly(s)
    banner = [line for line in s.lines if "WARNING" in line]
    assert any("WARNING: open mode — no API keys; anyone who can reach 0.0.0.0:" in line
               and line.endswith("has full access.") for line in banner), s.output()
    assert any("--host 0.0.0.0 is not a loopback address" in line for line in banner), s.output()


@pytest.mark.parametrize("host,auth,insecure,admin_key,mode", [
    ("127.0.0.1", None, False, False, "open"),
    ("127.8.9.10", None, False, False, "open"),
    ("localhost", None, False, False, "open"),
    ("::1", None, False, False, "open"),
    ("127.0.0.1", None, False, True, "keys"),  # an admin key means keys
    ("127.0.0.1", "keys", False, False, "keys"),  # keys may already be in Redis
    ("127.0.0.1", "open", False, True, "open"),
    ("0.0.0.0", None, False, True, "keys"),
    ("0.0.0.0", None, True, False, "open"),
    ("0.0.0.0", None, True, True, "keys"),  # --insecure permits open, it does not force it
    ("0.0.0.0", "keys", False, False, "keys"),
    ("0.0.0.0", "open", True, False, "open"),
    ("192.168.1.5", None, True, False, "open"),
])
def test_auth_mode(host, auth, insecure, admin_key, mode):
    assert serve.auth_mode(host, auth, insecure=insecure, admin_key=admin_key) == mode


@pytest.mark.parametrize("host,auth,message", [
    ("0.0.0.0", None, "--host 0.0.0.0 is not a loopback address: set MINIDALLE_ADMIN_KEY (keys are required) or "
                      "pass --insecure to run open"),
    ("::", None, "--host :: is not a loopback address"),
    ("myhost.example", None, "--host myhost.example is not a loopback address"),  # a name may resolve anywhere
    ("10.0.0.1", "open", "--host 10.0.0.1 is not a loopback address: open mode (--auth open) needs --insecure"),
])
def test_auth_mode_refuses_open_on_a_public_host_unless_insecure(host, auth, message):
    with pytest.raises(ValueError) as e:
        serve.auth_mode(host, auth, insecure=False, admin_key=False)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.255.0.1", True), ("::1", True),
                                           ("[::1]", True), ("localhost", True), ("LOCALHOST", True),
                                           ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
                                           ("10.1.2.3", False), ("example.com", False), ("128.0.0.1", False)])
def test_is_loopback(host, loopback):
    assert serve.is_loopback(host) is loopback


# ---- the restart policy, without a stack ---------------------------------------------------------------------------

def test_backoff_doubles_to_30s_and_starts_over_after_a_minute_up():
    child = serve.Child("worker1", ["true"], {})
    delays = []
    for _ in range(7):  # each death a second after its start
        delays.append(child.schedule_restart(child.started_at + 1))
        child.started_at = child.restart_at
    assert delays == [1, 2, 4, 8, 16, 30, 30] and child.restarts == 7
    assert child.schedule_restart(child.started_at + 61) == 1  # it had stayed up a minute
    child.started_at = child.restart_at
    assert child.schedule_restart(child.started_at + 1) == 2


def _supervisor() -> serve.Supervisor:
    return serve.Supervisor(serve.parse_args(["--stop-timeout", "5"]))


def test_supervisor_restarts_a_child_after_its_backoff_and_cleans_up(capsys):
    sup = _supervisor()
    forgotten = []
    child = sup.spawn("worker1", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                      on_exit=lambda: forgotten.append(True))
    try:
        first = child.proc
        wait_until(lambda: first.poll() is not None, 30, "the child to exit")
        now = time.monotonic()
        sup.check(now)
        assert forgotten == [True] and child.proc is first
        out = capsys.readouterr().out
        assert "[minidalle serve] worker1 exited with status 3; restarting in 1.0s (restart 1)" in out
        sup.check(now + 0.5)
        assert child.proc is first  # its backoff is not over
        sup.check(now + 1.0)
        assert child.proc is not first and child.restart_at is None
        assert f"worker1 started again (pid {child.proc.pid})" in capsys.readouterr().out
    finally:
        sup.stop_all()


def test_supervisor_restarts_nothing_once_stop_is_requested():
    sup = _supervisor()
    child = sup.spawn("api", [sys.executable, "-c", "pass"], dict(os.environ))
    try:
        first = child.proc
        wait_until(lambda: first.poll() is not None, 30, "the child to exit")
        sup.check(time.monotonic())
        sup.stop_requested = True
        sup.check(time.monotonic() + 100)
        assert child.proc is first
        sup.run()  # returns at once
        assert child.proc is first
    finally:
        sup.stop_all()
