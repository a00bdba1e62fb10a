import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ on the path: `_support`

import pytest  # noqa: E402
import redis  # noqa: E402
from _support.fixtures import *  # noqa: E402,F403
from _support.servers import start_redis  # noqa: E402

from worker.jobs import JobStore  # noqa: E402


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
