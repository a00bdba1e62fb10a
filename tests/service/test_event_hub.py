"""The API's event hub on a real redis-server: many listeners share one reader, each gets every event once and in
order, waits outlast redis-py's socket timeout, a key's streams are capped, a slow listener catches up by itself."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi import HTTPException

from jobs.store import JobStore, events_key
from service import events as hub_module
from service.events import EventHub, short_command_client
from service.views import wait_for_end


def _url(client) -> str:
    return "redis://{host}:{port}/{db}".format(**client.connection_pool.connection_kwargs)


async def _hub(client, per_owner: int = 10_000) -> EventHub:
    return EventHub(_url(client), short_command_client(_url(client), 16), per_owner=per_owner)


def _progress(store: JobStore, job_id: str, n: int) -> None:
    for i in range(1, n + 1):
        store.r.xadd(events_key(job_id), {"type": "progress", "data": json.dumps({"step": i, "total": n})})


async def _collect(hub: EventHub, job_id: str, owner: str = "k") -> list[int]:
    steps = []
    async with hub.listen(job_id, "0", owner) as listener:
        async for entry in listener.events(30):
            if entry is not None and entry[1]["type"] == "progress":
                steps.append(json.loads(entry[1]["data"])["step"])
    return steps


def test_a_thousand_listeners_share_one_reader_and_all_get_every_event(store):
    job_id = store.create("generate", {"prompt": "p"})
    _progress(store, job_id, 5)  # history a late listener must get too

    async def main():
        hub = await _hub(store.r)
        tasks = [asyncio.create_task(_collect(hub, job_id, owner=f"k{i % 7}")) for i in range(1000)]
        await asyncio.sleep(0.5)  # all registered: the rest is live
        clients = await hub.pool.execute_command("CLIENT", "LIST")
        _progress_live = threading.Thread(target=lambda: (_progress_from(store, job_id, 6, 40),
                                                          store.finish(job_id, "succeeded", result={})))
        _progress_live.start()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        _progress_live.join()
        await hub.close()
        await hub.pool.aclose()
        return results, clients

    results, clients = asyncio.run(main())
    assert all(r == list(range(1, 41)) for r in results), {tuple(r) for r in results if r != list(range(1, 41))}
    # one blocking reader plus the short-command pool, not a connection per listener
    assert len(str(clients).splitlines()) < 30, clients


def _progress_from(store: JobStore, job_id: str, first: int, last: int) -> None:
    for i in range(first, last + 1):
        store.r.xadd(events_key(job_id), {"type": "progress", "data": json.dumps({"step": i, "total": last})})
        time.sleep(0.005)


def test_a_key_past_its_stream_cap_gets_429_and_others_are_unaffected(store):
    job_id = store.create("generate", {"prompt": "p"})

    async def main():
        hub = await _hub(store.r, per_owner=3)
        opened = [hub.listen(job_id, "0", "greedy") for _ in range(3)]
        for cm in opened:
            await cm.__aenter__()
        with pytest.raises(HTTPException) as e:
            await hub.listen(job_id, "0", "greedy").__aenter__()
        other = asyncio.create_task(_collect(hub, job_id, owner="polite"))
        await asyncio.sleep(0.2)
        store.finish(job_id, "succeeded", result={})
        steps = await asyncio.wait_for(other, 10)
        for cm in opened:
            await cm.__aexit__(None, None, None)
        async with hub.listen(job_id, "0", "greedy"):  # closed ones are given back
            pass
        await hub.close()
        await hub.pool.aclose()
        return e.value, steps

    error, steps = asyncio.run(main())
    assert error.status_code == 429 and error.headers["Retry-After"] and "3 event streams" in error.detail
    assert steps == []


def test_a_wait_outlasts_the_socket_timeout_and_wakes_at_the_final_event(store):
    job_id = store.create("generate", {"prompt": "p"})

    async def main():
        hub = await _hub(store.r)
        t0 = time.monotonic()
        still = await wait_for_end(hub, job_id, 6, "k")  # longer than redis-py's default 5 s socket timeout
        waited = time.monotonic() - t0
        threading.Timer(0.5, store.cancel, args=[job_id]).start()
        t0 = time.monotonic()
        ended = await wait_for_end(hub, job_id, 30, "k")
        woke = time.monotonic() - t0
        again = await wait_for_end(hub, job_id, 30, "k")  # already ended: at once
        await hub.close()
        await hub.pool.aclose()
        return still, waited, ended, woke, again

    still, waited, ended, woke, again = asyncio.run(main())
    assert still["state"] == "queued" and waited >= 5.9
    assert ended["state"] == "cancelled" and woke < 5
    assert again["state"] == "cancelled"


def test_a_listener_that_falls_behind_catches_up_from_redis(store, monkeypatch):
    monkeypatch.setattr(hub_module, "QUEUE_SIZE", 5)
    job_id = store.create("generate", {"prompt": "p"})

    async def main():
        hub = await _hub(store.r)
        async with hub.listen(job_id, "0", "k") as listener:
            seen = []
            events = listener.events(30)
            await asyncio.sleep(0.2)
            _progress(store, job_id, 50)  # more than its queue holds, while it reads nothing
            store.finish(job_id, "succeeded", result={})
            await asyncio.sleep(0.5)
            async for entry in events:
                if entry is not None:
                    seen.append(entry[1]["type"])
        await hub.close()
        await hub.pool.aclose()
        return seen, listener.lagged

    seen, _ = asyncio.run(main())
    assert seen == ["queued"] + ["progress"] * 50 + ["succeeded"]
