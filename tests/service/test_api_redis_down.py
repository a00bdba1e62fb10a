"""With Redis gone, the API says so: 503 naming the job store, not a bare 500; /healthz still answers."""

from __future__ import annotations

import httpx
from _support.servers import service_env, start_api, start_redis


def test_requests_get_503_while_redis_is_unreachable(tmp_path):
    redis_proc, url = start_redis(tmp_path / "redis")
    api, base = start_api(service_env(url, tmp_path / "data"), log_dir=tmp_path / "logs")
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/jobs").status_code == 200
            redis_proc.stop()
            for method, path, body in (("POST", "/generate", {"prompt": "a cat", "num_inference_steps": 2}),
                                       ("POST", "/generate?wait=5", {"prompt": "a cat", "num_inference_steps": 2}),
                                       ("GET", "/jobs", None), ("GET", "/jobs/" + "ab" * 16, None)):
                r = c.request(method, path, json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert "job store (Redis) is unreachable" in r.json()["detail"]
                assert r.headers["retry-after"] == "5"
            assert c.get("/healthz").status_code == 200  # the process itself is fine
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"
            assert "127.0.0.1" not in ready.text and "6379" not in ready.text  # no address in answers
    finally:
        api.stop()
        redis_proc.stop()
