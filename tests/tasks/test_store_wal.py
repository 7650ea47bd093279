"""The SQLite result store's WAL stays bounded under writes that never pause, is reused rather than cut in a
task's commit, and is cut back once the store is quiet (issue 15: the WAL of a busy store grew without bound,
and each restart cut tens of MiB from it inside a task's commit).

Assertions are on WAL file sizes, never on how long anything took.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskstream.tasks.stores import sqlite_upkeep
from taskstream.tasks.stores.base import TaskInfo
from taskstream.tasks.stores.sqlite import SQLiteResultStore
from tests.support.waiting import wait_for

MIB = 1024 * 1024


def _wal(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


async def _task(store: SQLiteResultStore) -> None:
    task_id = uuid.uuid4().hex
    assert await store.claim(task_id, name="f", queue="q", worker="w:1", started_at=1.0) is None
    await store.finish(TaskInfo(task_id, name="f", queue="q", status="success", attempts=1, result="x" * 200))


async def _tasks(store: SQLiteResultStore, total: int, lanes: int = 8) -> None:
    """Claim and finish ``total`` tasks, ``lanes`` at a time and without a pause (about 10 KiB of WAL each)."""
    left = total

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _task(store)

    await asyncio.gather(*(lane() for _ in range(lanes)))


def _wal_salt(path: Path) -> bytes:
    """The WAL header's salt: SQLite draws a new one each time it starts the WAL over from its beginning."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(32)[16:24]


class WriterOutpacesCheckpoint:
    """The upkeep's connection, with each passive checkpoint it runs unheld left behind by a commit.

    What a writer that never pauses does to a checkpoint: it commits while the checkpoint copies, so frames
    remain uncopied when it ends. Made certain here: a reader pins the WAL's end, a commit follows, the
    checkpoint copies up to the pinned end only, then the reader lets go.
    """

    def __init__(self, store: SQLiteResultStore) -> None:
        self.store = store
        self.conn = store._upkeep._connection()
        self.writer = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
        self.reader = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql != "PRAGMA wal_checkpoint(PASSIVE)" or self.store._lock.locked():
            return self.conn.execute(sql, *args)
        self.reader.execute("BEGIN")
        self.reader.execute("SELECT count(*) FROM taskstream_tasks").fetchone()
        self.writer.execute(
            "INSERT INTO taskstream_tasks (task_id, status, expires_at) VALUES (?, 'x', 0)", (uuid.uuid4().hex,)
        )
        try:
            return _Rows(self.conn.execute(sql, *args).fetchall())
        finally:
            self.reader.execute("COMMIT")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        self.conn.close()


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0]

    def fetchall(self) -> list[Any]:
        return self.rows


async def test_the_wal_starts_over_while_writes_never_pause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A passive checkpoint never catches up with a writer that commits all the time, so SQLite would never start
    # the WAL over: the upkeep finishes the checkpoint with the store's writers held.
    monkeypatch.setattr(sqlite_upkeep, "WAL_CATCH_UP_BYTES", 2 * MIB)
    store = SQLiteResultStore(tmp_path / "busy.sqlite3")
    try:
        await _tasks(store, 400)  # about 4 MiB of WAL
        await asyncio.to_thread(store._upkeep.stop)  # the upkeep thread gone: only the pass this test runs
        started = _wal_salt(store.path)
        store._upkeep._conn = WriterOutpacesCheckpoint(store)  # type: ignore[assignment]
        store.upkeep()
        await _task(store)
        assert _wal_salt(store.path) != started, "the WAL was not started over"
    finally:
        await store.close()


async def test_a_task_commit_reuses_the_wal_file_instead_of_cutting_it(tmp_path: Path) -> None:
    path = tmp_path / "reuse.sqlite3"
    store = SQLiteResultStore(path)
    try:
        await _tasks(store, 2500)  # about 25 MiB of WAL, more than SQLite's usual journal_size_limit of 16 MiB
        grown = _wal(path)
        assert grown > 20 * MIB
        store.upkeep()  # every frame copied: the next write starts the WAL over from its beginning
        await _task(store)
        assert _wal(path) == grown  # the same blocks written again, not cut and regrown
    finally:
        await store.close()


async def test_a_quiet_store_cuts_its_large_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_upkeep, "WAL_KEEP_BYTES", 1 * MIB)
    path = tmp_path / "quiet.sqlite3"
    store = SQLiteResultStore(path, ttl=2.0)  # an upkeep pass every half second; quiet after one
    try:
        await _tasks(store, 400)
        assert _wal(path) > 2 * MIB
        # (the expiry of these records may write a few pages to the WAL again after the cut)
        await wait_for(lambda: _wal(path) < MIB, what="the quiet store's WAL cut back", timeout=15.0)
        await _task(store)  # still written and read as before
        assert store.get(uuid.uuid4().hex) is None
    finally:
        await store.close()
