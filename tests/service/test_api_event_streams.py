"""Event streams through real HTTP: many listeners on one job all get every event; a key past its stream cap gets a
clean 429 and nobody else is affected."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from _support.servers import Stack

from jobs.keys import KeyStore

CAP = 40


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("streams"), MINIDALLE_AUTH="keys", MINIDALLE_KEY_EVENT_STREAMS=str(CAP))
    yield s
    s.stop()


async def _listen(c: httpx.AsyncClient, url: str, opened: asyncio.Event | None = None) -> tuple[int, list[str]]:
    async with c.stream("GET", url) as r:
        if opened is not None:
            opened.set()
        if r.status_code != 200:
            await r.aread()
            return r.status_code, []
        kinds = []
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: ").strip())
        return 200, kinds


def test_listeners_past_the_cap_get_429_the_rest_every_event(streams):
    keys = KeyStore(streams.redis)
    greedy, _ = keys.create("greedy")
    polite, _ = keys.create("polite")

    async def main():
        limits = httpx.Limits(max_connections=200)
        auth = {"Authorization": f"Bearer {greedy}"}
        async with httpx.AsyncClient(base_url=streams.base_url, headers=auth, timeout=60, limits=limits) as g, \
                httpx.AsyncClient(base_url=streams.base_url, headers={"Authorization": f"Bearer {polite}"},
                                  timeout=60) as p:
            job = (await g.post("/generate", json={"prompt": "x", "num_inference_steps": 2})).json()["job_id"]
            url = f"/jobs/{job}/events"
            opened = [asyncio.Event() for _ in range(CAP + 10)]
            tasks = [asyncio.create_task(_listen(g, url, e)) for e in opened]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 30)
            mine = (await p.post("/generate", json={"prompt": "y", "num_inference_steps": 2})).json()["job_id"]
            polite_stream = asyncio.create_task(_listen(p, f"/jobs/{mine}/events"))
            await asyncio.sleep(0.5)
            assert (await g.post(f"/jobs/{job}/cancel")).status_code == 202  # the event every listener must get
            assert (await p.post(f"/jobs/{mine}/cancel")).status_code == 202
            return await asyncio.wait_for(asyncio.gather(*tasks), 30), await asyncio.wait_for(polite_stream, 30)

    results, polite_result = asyncio.run(main())
    codes = [code for code, _ in results]
    assert codes.count(200) == CAP and codes.count(429) == 10, codes
    assert all(kinds == ["queued", "cancelled"] for code, kinds in results if code == 200), results
    assert polite_result == (200, ["queued", "cancelled"])  # another key is not affected


def test_streams_a_client_drops_give_their_place_back(streams):
    token, _ = KeyStore(streams.redis).create("fickle")

    async def main():
        async with httpx.AsyncClient(base_url=streams.base_url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=30) as c:
            job = (await c.post("/generate", json={"prompt": "x", "num_inference_steps": 2})).json()["job_id"]
            codes = []
            for _ in range(CAP + 10):  # more than the cap, one after the other, each dropped after its first event
                async with c.stream("GET", f"/jobs/{job}/events") as r:
                    codes.append(r.status_code)
                    async for line in r.aiter_lines():
                        if line.startswith("event: "):
                            break
                await asyncio.sleep(0.02)
            await c.post(f"/jobs/{job}/cancel")
            return codes

    codes = asyncio.run(main())
    assert codes.count(429) <= 2 and codes[-1] == 200, codes  # a slot comes back once the server sees the drop
