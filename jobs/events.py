"""A running job's events, sent from the worker's compute thread without waiting on Redis. Torch-free."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from jobs.store import JobStore

log = logging.getLogger(__name__)


class EventChannel:
    """A running job's events, pipelined over one connection of its own.

    `send` writes a batch and returns without waiting for Redis; `receive` reads that batch's replies, the last
    of which are the job's cancel / owner fields. A worker sends after a step and receives during the next one,
    when the replies have long arrived, so its compute loop does not wait on round trips. At most one batch is
    in flight: `send` first receives the previous one, so replies never get out of step with their commands.
    A command Redis refused (OOM, READONLY, ...) is logged; the flags are still read. A broken connection is
    dropped and raises; the next `send` opens another.
    """

    READ_TIMEOUT_S = 30.0  # replies are normally there already; this only bounds a Redis that hangs

    def __init__(self, store: JobStore, job_id: str, worker: str):
        self.store, self.job_id, self.worker = store, job_id, worker
        self._conn: Any = None  # a redis-py Connection of the store's pool, while a batch may be in flight
        self._in_flight = 0  # replies still to read

    def send(self, events: list[tuple[str, dict]], extra: Sequence[tuple] = ()) -> tuple[bool, bool] | None:
        """Write a batch; returns the previous batch's outcome (see `receive`) if one was still in flight."""
        try:
            previous = self.receive()
        except redis.RedisError:  # its connection is gone; this batch goes on a new one
            previous = None
        commands = self.store.event_commands(self.job_id, events, extra)
        if self._conn is None:
            self._conn = self.store.r.connection_pool.get_connection()
        try:
            self._conn.send_packed_command(self._conn.pack_commands(commands))
        except BaseException:
            self._drop()
            raise
        self._in_flight = len(commands)
        return previous

    def receive(self) -> tuple[bool, bool] | None:
        """The last batch's outcome: (cancel requested, still owned by this worker); None if none is in flight."""
        if not self._in_flight or self._conn is None:
            return None
        replies: list = []
        try:
            for _ in range(self._in_flight):
                try:
                    replies.append(self._conn.read_response(timeout=self.READ_TIMEOUT_S))
                except redis.ResponseError as e:  # one command failed; the others' replies still follow
                    replies.append(e)
        except BaseException:
            self._drop()
            raise
        finally:
            self._in_flight = 0
        failed = [r for r in replies[:-1] if isinstance(r, Exception)]
        if failed:
            log.warning("job %s: Redis refused %d of %d event commands: %s", self.job_id, len(failed),
                        len(replies) - 1, failed[0])
        if isinstance(replies[-1], Exception):
            raise replies[-1]
        cancel, owner, state = replies[-1]
        return cancel == "1", owner == self.worker and state == "running"

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self.receive()
        except Exception:  # noqa: BLE001 - closing: the connection is dropped anyway
            pass
        if self._conn is not None:
            self.store.r.connection_pool.release(self._conn)
            self._conn = None

    def _drop(self) -> None:
        self._in_flight = 0
        if self._conn is not None:
            self._conn.disconnect()
            self.store.r.connection_pool.release(self._conn)
            self._conn = None
