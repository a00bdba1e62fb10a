"""Kinds of job and their queues: an import (POST /adapters) runs on the generate queue, under its bounds and time
limit, and is counted under its own kind everywhere else."""

from __future__ import annotations

from jobs.kinds import KINDS, QUEUE_OF, QUEUES
from jobs.queue import IMPORT_TASK, TASK_FOR_KIND, TASK_QUEUE
from jobs.settings import CommonSettings
from jobs.store import Bounds


def test_every_kind_has_a_task_on_a_known_queue():
    assert set(KINDS) == set(TASK_FOR_KIND) == {"generate", "finetune", "import"}
    assert set(QUEUE_OF.values()) == set(QUEUES)
    assert TASK_QUEUE[IMPORT_TASK] == "generate" and TASK_FOR_KIND["import"] == IMPORT_TASK
    s = CommonSettings(generate_time_limit_s=100, finetune_time_limit_s=9000)
    assert (s.time_limit_s("generate"), s.time_limit_s("import"), s.time_limit_s("finetune")) == (100, 100, 9000)


def test_an_import_waits_in_the_generate_queue_and_shares_its_bounds(store):
    bounds = Bounds(queued_jobs=2)
    assert store.admit("generate", {}, job_id="a" * 32, owner="k", estimate_s=1.0, bounds=bounds).ok
    assert store.admit("import", {}, job_id="b" * 32, owner="k", estimate_s=5.0, bounds=bounds).ok
    assert store.queued("generate") == (2, 6.0) and store.queued("finetune") == (0, 0.0)
    full = store.admit("import", {}, job_id="c" * 32, owner="k", estimate_s=5.0, bounds=bounds)
    assert not full.ok and full.reason == "queue_full"
    assert store.claim("b" * 32, "w1", stale_after_s=30, max_attempts=3).outcome == "run"
    assert store.queued("generate") == (1, 1.0)  # claimed: no longer waiting
    store.finish("b" * 32, "failed", error="file: not a LoRA")
    assert store.cancel("a" * 32) == "cancelled"
    assert store.queued("generate") == (0, 0.0)
    counts = store.counts()
    assert counts[("import", "failed")] == 1 and counts[("generate", "cancelled")] == 1
    assert store.get("b" * 32)["kind"] == "import"
