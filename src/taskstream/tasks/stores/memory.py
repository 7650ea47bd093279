"""The in-process result store: a dict behind a lock, shared by name within one process.

The default with the memory broker. Expired records are dropped when read and swept on writes.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace

from taskstream.tasks.stores.base import FINAL_STATES, ResultStore, TaskInfo

__all__ = ["MemoryResultStore"]

_SHARED: weakref.WeakValueDictionary[str, MemoryResultStore] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()
_SWEEP_EVERY = 30.0


class MemoryResultStore(ResultStore):
    """Task records in this process's memory.

    Example:
        >>> store = MemoryResultStore()
        >>> store.try_cancel("abc"), store.get("abc").status
        (True, 'cancelled')
    """

    def __init__(self, *, ttl: float = 86400.0, name: str = "") -> None:
        self.ttl = ttl
        self.url = f"memory://{name}"
        self._records: dict[str, TaskInfo] = {}
        self._lock = threading.Lock()
        self._next_sweep = time.time() + _SWEEP_EVERY

    @classmethod
    def shared(cls, name: str, *, ttl: float = 86400.0) -> MemoryResultStore:
        """The store called ``name`` in this process (a fresh private one when ``name`` is empty)."""
        if not name:
            return cls(ttl=ttl)
        with _SHARED_LOCK:
            store = _SHARED.get(name)
            if store is None:
                store = cls(ttl=ttl, name=name)
                _SHARED[name] = store
            return store

    def _live(self, task_id: str, now: float) -> TaskInfo | None:
        record = self._records.get(task_id)
        if record is not None and record.expires_at is not None and record.expires_at < now:
            del self._records[task_id]
            return None
        return record

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY
        for task_id in [k for k, v in self._records.items() if v.expires_at is not None and v.expires_at < now]:
            del self._records[task_id]

    async def add_pending(self, records: Sequence[TaskInfo]) -> None:
        now = time.time()
        with self._lock:
            self._sweep(now)
            for record in records:
                if self._live(record.task_id, now) is None:
                    self._records[record.task_id] = record.with_ttl(self.ttl, now)

    async def claim(
        self, task_id: str, *, name: str, queue: str, worker: str, started_at: float, reply_to: str = ""
    ) -> TaskInfo | None:
        now = time.time()
        with self._lock:
            record = self._live(task_id, now)
            if record is not None and (record.status in FINAL_STATES or _other_submitter(record, reply_to)):
                return replace(record)
            base = record or TaskInfo(task_id, name=name, queue=queue, submitted_at=started_at)
            self._records[task_id] = replace(
                base,
                status="running",
                started_at=started_at,
                attempts=base.attempts + 1,
                worker=worker,
                expires_at=now + self.ttl,
                reply_to=base.reply_to or reply_to,
            )
            return None

    async def finish(self, info: TaskInfo) -> None:
        now = time.time()
        with self._lock:
            self._records[info.task_id] = info.with_ttl(self.ttl, now)

    async def record_refusal(self, info: TaskInfo) -> bool:
        now = time.time()
        with self._lock:
            record = self._live(info.task_id, now)
            if record is None:
                self._records[info.task_id] = info.with_ttl(self.ttl, now)
                return True
            if record.status in FINAL_STATES or _other_submitter(record, info.reply_to):
                return False
            self._records[info.task_id] = replace(
                record,
                name=record.name or info.name,
                status=info.status,
                finished_at=info.finished_at,
                worker=info.worker,
                error=info.error,
                result=None,
                reply_to=record.reply_to or info.reply_to,
                expires_at=now + self.ttl,
            )
            return True

    def get(self, task_id: str) -> TaskInfo | None:
        with self._lock:
            record = self._live(task_id, time.time())
            return replace(record) if record is not None else None

    def try_cancel(self, task_id: str) -> bool:
        now = time.time()
        with self._lock:
            record = self._live(task_id, now)
            if record is not None and record.status != "pending":
                return False
            base = record or TaskInfo(task_id)
            self._records[task_id] = replace(base, status="cancelled", finished_at=now, expires_at=now + self.ttl)
            return True


def _other_submitter(record: TaskInfo, reply_to: str) -> bool:
    """True when ``record`` names a submitting reply queue and it is not ``reply_to``."""
    return bool(record.reply_to) and record.reply_to != reply_to
