"""`minidalle serve` (service.serve.serve_main) as a user runs it: one command, embedded Redis, Ctrl-C stops all."""

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
from _support.servers import REPO, pids_where


def _processes_with_env(key: str, value: str) -> list[int]:
    """pids whose environment has key=value (the serve's children inherit MINIDALLE_DATA_DIR)."""
    needle = f"{key}={value}".encode()
    return pids_where(lambda pid: needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))


def _processes_working_in(folder: str) -> list[int]:
    """pids whose working directory is in `folder` (redis-server chdirs to its --dir and rewrites its cmdline)."""
    return pids_where(lambda pid: os.readlink(f"/proc/{pid}/cwd").startswith(folder))


def test_serve_starts_everything_generates_and_repeated_ctrl_c_stops_all(tmp_path):
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIDALLE_")}  # no MINIDALLE_REDIS_URL
    env.update(MINIDALLE_TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    code = "import sys; from service.serve import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--data-dir", str(data), "--log-level",
                             "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "[minidalle serve] ready:" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "\n".join(lines)
        base = next(line.split()[-1] for line in lines if "[minidalle serve] API" in line)
        assert base.startswith("http://127.0.0.1:")
        assert any("redis redis://127.0.0.1:" in line and "(embedded" in line for line in lines)
        assert any(line.endswith("/docs") for line in lines)
        r = httpx.post(base + "/generate?wait=60", json={"prompt": "a red circle", "num_inference_steps": 2},
                       timeout=90)
        assert r.status_code == 200, r.text
        assert r.json()["job"]["state"] == "succeeded"
        assert httpx.get(base + r.json()["job"]["result"]["images"][0]["url"]).status_code == 200
        assert httpx.get(base + "/readyz").status_code == 200
        children = _processes_with_env("MINIDALLE_DATA_DIR", str(data.resolve()))
        assert len(children) >= 2  # the worker and the API (redis gets no MINIDALLE_DATA_DIR)

        for _ in range(2000):  # Ctrl-C pressed again and again (and faster): the handler must not deadlock
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "\n".join(lines)
        reader.join(timeout=5)
        assert lines[-1] == "[minidalle serve] stopped"
        time.sleep(0.2)
        assert _processes_with_env("MINIDALLE_DATA_DIR", str(data.resolve())) == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/healthz", timeout=2)
        assert (data / "redis" / "appendonly.aof").is_file() or (data / "redis" / "appendonlydir").is_dir()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        leftovers = set(_processes_with_env("MINIDALLE_DATA_DIR", str(data.resolve())))
        leftovers |= set(_processes_working_in(str(data.resolve())))  # the embedded redis-server
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args,message", [(["--workers", "0"], "--workers: 0 is not in [1, 64]"),
                                          (["--queues", "generate,render"], "--queues: unknown queue(s) ['render']"),
                                          (["--port", "70000"], "--port: 70000 is not in [0, 65535]")])
def test_serve_rejects_bad_options(args, message):
    r = subprocess.run([sys.executable, "-c", "import sys; from service.serve import serve_main; "
                        "sys.exit(serve_main(sys.argv[1:]))", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
