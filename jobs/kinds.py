"""The kinds of job and the Celery queue each runs on. Torch-free, dependency-free (settings, the store and the queue
all read it).

A queue has its own workers, bounds (`max_queued_{queue}`, `max_queued_{queue}_s`), time limit
(`{queue}_time_limit_s`) and admission accounting; a kind borrows all of them from its queue.
"""

from __future__ import annotations

QUEUES = ("generate", "finetune")
# an import converts and checks one LoRA file in seconds: it waits with the images, not behind day-long fine-tunes
QUEUE_OF = {"generate": "generate", "finetune": "finetune", "import": "generate"}
KINDS = tuple(QUEUE_OF)


def queue_of(kind: str) -> str:
    """The queue a kind runs on (an unknown kind: the queue of its own name)."""
    return QUEUE_OF.get(kind, kind)
