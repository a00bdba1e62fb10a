"""Fixtures shared by tests/jobs, tests/service and tests/worker (each conftest star-imports this module)."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest
import redis
from PIL import Image

from _support.servers import Stack, start_redis
from jobs.store import JobStore

__all__ = ["SMALL_CAPS", "client", "store",
           "stack", "make_zip", "png_bytes", "shapes_dataset_zip", "sse_events", "iter_sse", "wait_job",
           "_dump_logs_on_failure", "pytest_runtest_makereport"]

_STACKS: list[Stack] = []
# caps small enough that tests can cross each of them cheaply
SMALL_CAPS = {"MINIDALLE_MAX_WIDTH": "256", "MINIDALLE_MAX_HEIGHT": "256", "MINIDALLE_MAX_IMAGES": "4",
              "MINIDALLE_MAX_STEPS": "50", "MINIDALLE_MAX_TRAIN_STEPS": "1000",
              "MINIDALLE_MAX_UPLOAD_BYTES": "300000", "MINIDALLE_MAX_WAIT_S": "60"}


@pytest.fixture(scope="session")
def client(tmp_path_factory):
    """One real redis-server for the tests that talk to Redis directly (not through the API)."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    r = redis.Redis.from_url(url, decode_responses=True)
    yield r
    r.close()
    proc.stop()


@pytest.fixture
def store(client) -> JobStore:
    """A job store on an emptied database."""
    client.flushdb()
    return JobStore(client, ttl_s=120, events_maxlen=1000)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for s in _STACKS:
            print(s.logs())


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One redis + API + a worker serving both queues, for the whole session."""
    s = Stack(tmp_path_factory.mktemp("stack"), workers={"w1": "generate,finetune"}, **SMALL_CAPS)
    _STACKS.append(s)
    yield s
    _STACKS.remove(s)
    s.stop()


def png_bytes(color=(255, 0, 0), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return buf.getvalue()


def shapes_dataset_zip(n: int = 4) -> bytes:
    """A tiny kohya-style dataset: solid squares with captions."""
    colors = [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255)), ("yellow", (255, 255, 0))]
    entries = {}
    for i in range(n):
        name, rgb = colors[i % len(colors)]
        entries[f"img{i}.png"] = png_bytes(rgb)
        entries[f"img{i}.txt"] = f"a {name} square".encode()
    return make_zip(entries)


def iter_sse(response: httpx.Response):
    """Parse a text/event-stream body (the WHATWG format): yields (event, id, data string) per event."""
    event, eid, data = "message", None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, eid, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue  # comment (keep-alive ping)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "id":
            eid = value
        elif field == "data":
            data.append(value)


def sse_events(client: httpx.Client, url: str, timeout: float = 60, headers: dict | None = None,
               on_event=None, until=None) -> list:
    """A job's events until the server ends the stream (or until `until(event)` is true for one):
    [(event, id, data dict), ...]."""
    out = []
    with client.stream("GET", url, timeout=timeout, headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, eid, data in iter_sse(response):
            out.append((event, eid, json.loads(data) if data else {}))
            if on_event is not None:
                on_event(out[-1])
            if until is not None and until(out[-1]):
                break
    return out


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    """Wait for the job's final event on its SSE stream, then return the record."""
    sse_events(client, f"/jobs/{job_id}/events", timeout=timeout)
    return client.get(f"/jobs/{job_id}").json()
