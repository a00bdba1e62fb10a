"""API keys and ownership through the real stack (keys mode): for every route, the owner, another key, an admin,
no key and a revoked key get what they should — another key's things are 404, never 403 or 200."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from _support.adapters import build_adapter
from _support.fixtures import png_bytes, shapes_dataset_zip, sse_events, wait_job
from _support.servers import Stack

from jobs.keys import KeyStore, Limits
from jobs.volume import Volume, write_access
from minidalle.embedded import default_model

ADMIN_KEY = "md_test-admin-key-0123456789"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("keyed"), workers={"w1": "generate,finetune"}, MINIDALLE_AUTH="keys",
              MINIDALLE_ADMIN_KEY=ADMIN_KEY)
    keys = KeyStore(s.redis)
    tokens = {"owner": keys.create("alice")[0], "other": keys.create("bob")[0], "admin": ADMIN_KEY}
    revoked, _ = keys.create("carol")
    keys.revoke("carol")
    tokens["revoked"] = revoked
    s.clients = {who: httpx.Client(base_url=s.base_url, timeout=60, headers={"Authorization": f"Bearer {t}"})
                 for who, t in tokens.items()}
    s.clients["none"] = httpx.Client(base_url=s.base_url, timeout=60)
    s.things = _make_things(s)
    yield s
    for c in s.clients.values():
        c.close()
    s.stop()


def _make_things(s) -> dict:
    alice = s.clients["owner"]
    r = alice.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2, "seed": 1})
    assert r.status_code == 202, r.text
    job = wait_job(alice, r.json()["job_id"])
    assert job["state"] == "succeeded" and job["owner"].startswith("key_"), job
    r = alice.post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    assert r.status_code == 201, r.text
    adapter = _adapter(s, "alices-style", owner=job["owner"])
    return {"job": job["id"], "dataset": r.json()["dataset_id"], "adapter": adapter, "owner_id": job["owner"]}


def _adapter(s, name: str, owner: str | None) -> str:
    """A published adapter on the volume (as a fine-tune leaves it), owned by `owner`."""
    unet = json.loads((Path(default_model()) / "unet" / "config.json").read_text())
    path = Volume(s.data_dir).adapter(name)
    build_adapter(path, unet_config=unet)
    write_access(path, owner=owner, visibility="private")
    return name


WHO = ("owner", "other", "admin", "none", "revoked")


def _codes(s, method: str, url: str, **kw) -> dict[str, int]:
    return {who: s.clients[who].request(method, url, **kw).status_code for who in WHO}


def test_reads_of_a_job_and_its_files(keyed):
    t = keyed.things
    expect = {"owner": 200, "other": 404, "admin": 200, "none": 401, "revoked": 401}
    assert _codes(keyed, "GET", f"/jobs/{t['job']}") == expect
    assert _codes(keyed, "GET", f"/images/{t['job']}/0.png") == expect
    assert _codes(keyed, "GET", f"/jobs/{t['job']}/events") == expect
    assert _codes(keyed, "POST", f"/jobs/{t['job']}/cancel") == {**expect, "owner": 409, "admin": 409}
    assert _codes(keyed, "GET", f"/datasets/{t['dataset']}") == expect
    r = keyed.clients["none"].get(f"/jobs/{t['job']}")
    assert r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["detail"]
    assert keyed.clients["revoked"].get("/me").json()["detail"] == "unknown or revoked API key"


def test_every_route_needs_a_valid_key(keyed):
    t = keyed.things
    zipped = {"file": ("d.zip", shapes_dataset_zip(2), "application/zip")}
    routes = [("GET", "/jobs"), ("GET", "/adapters"), ("GET", "/me"), ("GET", "/usage"), ("GET", "/metrics"),
              ("POST", "/generate", {"json": {"prompt": "x", "num_inference_steps": 2}}),
              ("POST", "/datasets", {"files": zipped}),
              ("POST", "/finetune", {"json": {"name": "nokey", "dataset_id": t["dataset"], "steps": 2}}),
              ("GET", f"/jobs/{t['job']}/validation/final/0.png"),
              ("PATCH", f"/adapters/{t['adapter']}", {"json": {"visibility": "public"}}),
              ("DELETE", f"/adapters/{t['adapter']}")]
    for method, url, *kw in routes:
        for who in ("none", "revoked"):
            r = keyed.clients[who].request(method, url, **(kw[0] if kw else {}))
            assert r.status_code == 401, (who, method, url, r.status_code, r.text)
    r = keyed.clients["other"].post("/datasets", files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    assert r.status_code == 201  # any key may upload; the dataset is then its own
    assert keyed.clients["owner"].get(f"/datasets/{r.json()['dataset_id']}").status_code == 404


def test_lists_show_only_your_own(keyed):
    t = keyed.things
    ids = {who: [j["id"] for j in keyed.clients[who].get("/jobs").json()["jobs"]] for who in ("owner", "other",
                                                                                              "admin")}
    assert t["job"] in ids["owner"] and t["job"] in ids["admin"] and t["job"] not in ids["other"]
    names = {who: [a["name"] for a in keyed.clients[who].get("/adapters").json()["adapters"]]
             for who in ("owner", "other", "admin")}
    assert t["adapter"] in names["owner"] and t["adapter"] in names["admin"] and t["adapter"] not in names["other"]


def test_naming_another_keys_things_in_a_request_is_404(keyed):
    t = keyed.things
    body = {"prompt": "x", "num_inference_steps": 2, "adapters": [{"name": t["adapter"]}]}
    codes = _codes(keyed, "POST", "/generate", json=body)
    assert codes == {"owner": 202, "other": 404, "admin": 202, "none": 401, "revoked": 401}
    r = keyed.clients["other"].post("/generate", json=body)
    assert r.json()["detail"] == f"adapters.0.name: adapter {t['adapter']!r} not found"
    ft = {"name": "bobs-copy", "dataset_id": t["dataset"], "steps": 2}
    r = keyed.clients["other"].post("/finetune", json=ft)
    assert r.status_code == 404 and r.json()["detail"].startswith("dataset_id:"), r.text


def test_adapter_routes_and_read_only_sharing(keyed):
    name = _adapter(keyed, "shared-one", owner=keyed.things["owner_id"])
    hidden = {"owner": 200, "other": 404, "admin": 200, "none": 401, "revoked": 401}
    assert _codes(keyed, "GET", f"/adapters/{name}") == hidden
    assert _codes(keyed, "GET", f"/adapters/{name}/download") == hidden
    assert keyed.clients["other"].delete(f"/adapters/{name}").status_code == 404
    assert keyed.clients["other"].patch(f"/adapters/{name}", json={"visibility": "public"}).status_code == 404
    r = keyed.clients["owner"].patch(f"/adapters/{name}", json={"visibility": "public"})
    assert r.status_code == 200 and r.json()["visibility"] == "public" and r.json()["mine"] is True
    shared = {"owner": 200, "other": 200, "admin": 200, "none": 401, "revoked": 401}
    assert _codes(keyed, "GET", f"/adapters/{name}") == shared
    assert name in [a["name"] for a in keyed.clients["other"].get("/adapters").json()["adapters"]]
    r = keyed.clients["other"].post("/generate", json={"prompt": "x", "num_inference_steps": 2,
                                                       "adapters": [{"name": name}]})
    assert r.status_code == 202, r.text  # a shared adapter can be used by every key
    assert keyed.clients["other"].delete(f"/adapters/{name}").status_code == 403  # but not changed
    assert keyed.clients["other"].patch(f"/adapters/{name}", json={"visibility": "private"}).status_code == 403
    assert keyed.clients["admin"].patch(f"/adapters/{name}", json={"visibility": "private"}).status_code == 200
    assert keyed.clients["other"].get(f"/adapters/{name}").status_code == 404
    assert keyed.clients["owner"].delete(f"/adapters/{name}").status_code == 204
    assert keyed.clients["owner"].get(f"/adapters/{name}").status_code == 404


def test_account_routes(keyed):
    me = {who: keyed.clients[who].get("/me") for who in WHO}
    assert me["owner"].json()["name"] == "alice" and me["owner"].json()["admin"] is False
    assert me["admin"].json()["admin"] is True
    assert me["owner"].json()["webhook_secret"].startswith("whsec_")
    assert me["owner"].json()["webhook_secret"] != me["other"].json()["webhook_secret"]
    assert me["none"].status_code == 401 and me["revoked"].status_code == 401
    alice = keyed.things["owner_id"]
    usage = keyed.clients["owner"].get("/usage").json()
    assert usage["key"] == alice and usage["images"] >= 1 and usage["compute_s"] > 0
    assert usage["jobs"]["generate:succeeded"] >= 1 and usage["bytes_stored"]["datasets"] > 0
    assert keyed.clients["other"].get("/usage", params={"key": alice}).status_code == 404
    everyone = keyed.clients["admin"].get("/usage").json()["keys"]
    assert alice in [u["key"] for u in everyone]
    assert _codes(keyed, "GET", "/metrics") == {"owner": 403, "other": 403, "admin": 200, "none": 401,
                                                 "revoked": 401}
    assert {who: keyed.clients[who].get("/healthz").status_code for who in WHO} == dict.fromkeys(WHO, 200)


def test_rate_limit_answers_429_with_retry_after_and_headers(keyed):
    token, _ = KeyStore(keyed.redis).create("hasty", limits=Limits(requests_per_minute=5))
    with httpx.Client(base_url=keyed.base_url, headers={"Authorization": f"Bearer {token}"}) as c:
        answers = [c.get("/me") for _ in range(7)]
    assert [r.status_code for r in answers] == [200] * 5 + [429, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "5" and answers[0].headers["x-ratelimit-remaining"] == "4"
    assert int(answers[-1].headers["retry-after"]) >= 1 and answers[-1].headers["x-ratelimit-remaining"] == "0"
    assert keyed.clients["other"].get("/me").status_code == 200  # another key is not affected


def test_json_endpoints_take_only_json(keyed):
    r = keyed.clients["owner"].post("/generate", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = keyed.clients["owner"].post("/datasets", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 415
    assert "access-control-allow-origin" not in keyed.clients["owner"].get(
        "/healthz", headers={"Origin": "https://evil.example"}).headers  # CORS off unless configured


def test_events_of_your_own_job_stream(keyed):
    events = sse_events(keyed.clients["owner"], f"/jobs/{keyed.things['job']}/events")
    assert events[-1][0] == "succeeded" and all("worker" not in e[2] for e in events)
