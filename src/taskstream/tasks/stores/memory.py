"""The in-process result store: a dict behind a lock, shared by name within one process.

The default with the memory broker. Records are kept in the order of their last write, which is the order in
which they expire (every write sets ``expires_at = now + ttl``). Expired records are dropped when read, and each
write sweeps at most :data:`SWEEP_BATCH` expired records from the old end: never a scan of the whole store,
so a write costs the same with a million records as with none, and the store holds about a TTL's worth.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from taskstream.tasks.stores.base import FINAL_STATES, ResultStore, TaskInfo
from taskstream.urloptions import URLOptions

__all__ = ["SWEEP_BATCH", "MemoryResultStore"]

_SHARED: weakref.WeakValueDictionary[str, MemoryResultStore] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()
SWEEP_BATCH = 64  # expired records dropped per write at most (more than one write adds: the sweep keeps up)


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
        self._records: OrderedDict[str, TaskInfo] = OrderedDict()  # oldest last write first
        self._lock = threading.Lock()

    #: it reads no URL options: any given is refused by name
    OPTIONS: ClassVar[URLOptions] = URLOptions("memory result store", [])

    @classmethod
    def from_url(cls, url: str, *, ttl: float = 86400.0) -> MemoryResultStore:
        """The store ``memory://NAME`` names, shared by name (``memory://``: a fresh private one).

        Raises:
            ConfigurationError: the URL has a query option (this store reads none).
        """
        name, _, query = url.split("://", 1)[-1].partition("?")
        cls.OPTIONS.parse(query, url=url)
        return cls.shared(name, ttl=ttl)

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

    def __len__(self) -> int:
        """Records held, including expired ones not swept yet."""
        return len(self._records)

    def _live(self, task_id: str, now: float) -> TaskInfo | None:
        record = self._records.get(task_id)
        if record is not None and record.expires_at is not None and record.expires_at < now:
            del self._records[task_id]
            return None
        return record

    def _put(self, record: TaskInfo, now: float) -> None:
        """Store ``record`` as the newest write (it expires last), sweeping a few expired ones first."""
        self.sweep(now, limit=SWEEP_BATCH, locked=True)
        self._records[record.task_id] = record
        self._records.move_to_end(record.task_id)

    def sweep(self, now: float | None = None, *, limit: int | None = None, locked: bool = False) -> int:
        """Drop records that expired before ``now`` (default: the current time), oldest first.

        Args:
            now: the time to compare ``expires_at`` with.
            limit: drop at most this many (``None``: every expired one).
            locked: the caller holds the store's lock.

        Returns:
            How many records were dropped.
        """
        if not locked:
            with self._lock:
                return self.sweep(now, limit=limit, locked=True)
        cutoff = time.time() if now is None else now
        dropped = 0
        records = self._records
        while records and (limit is None or dropped < limit):
            task_id, oldest = next(iter(records.items()))
            if oldest.expires_at is None or oldest.expires_at >= cutoff:
                break
            del records[task_id]
            dropped += 1
        return dropped

    async def add_pending(self, records: Sequence[TaskInfo]) -> None:
        now = time.time()
        with self._lock:
            for record in records:
                if self._live(record.task_id, now) is None:
                    self._put(record.with_ttl(self.ttl, now), now)

    async def claim(
        self, task_id: str, *, name: str, queue: str, worker: str, started_at: float, reply_to: str = ""
    ) -> TaskInfo | None:
        now = time.time()
        with self._lock:
            record = self._live(task_id, now)
            if record is not None and (record.status in FINAL_STATES or _other_submitter(record, reply_to)):
                return replace(record)
            base = record or TaskInfo(task_id, name=name, queue=queue, submitted_at=started_at)
            claimed = replace(
                base,
                status="running",
                started_at=started_at,
                attempts=base.attempts + 1,
                worker=worker,
                expires_at=now + self.ttl,
                reply_to=base.reply_to or reply_to,
            )
            self._put(claimed, now)
            return None

    async def finish(self, info: TaskInfo) -> None:
        now = time.time()
        with self._lock:
            self._put(info.with_ttl(self.ttl, now), now)

    async def record_refusal(self, info: TaskInfo) -> bool:
        now = time.time()
        with self._lock:
            record = self._live(info.task_id, now)
            if record is None:
                self._put(info.with_ttl(self.ttl, now), now)
                return True
            if record.status in FINAL_STATES or _other_submitter(record, info.reply_to):
                return False
            refused = replace(
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
            self._put(refused, now)
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
            self._put(replace(base, status="cancelled", finished_at=now, expires_at=now + self.ttl), now)
            return True


def _other_submitter(record: TaskInfo, reply_to: str) -> bool:
    """True when ``record`` names a submitting reply queue and it is not ``reply_to``."""
    return bool(record.reply_to) and record.reply_to != reply_to
