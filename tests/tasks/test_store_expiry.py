"""Result stores stay bounded by their TTL: expiry runs by itself, bounded per pass, and the SQLite file stops growing.

Assertions are on record counts and file sizes after expiry, never on how long anything took.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from taskstream.errors import ConfigurationError
from taskstream.tasks.stores.base import TaskInfo, result_store_from_url
from taskstream.tasks.stores.memory import SWEEP_BATCH, MemoryResultStore
from taskstream.tasks.stores.sqlite import SQLiteResultStore
from taskstream.tasks.stores.sqlite_upkeep import _PURGE, FREE_RESERVE_PAGES, PURGE_BATCH, PURGE_ROUNDS
from tests.support.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/15"
PAD = "x" * 4000  # a result of about a page, so the file's growth shows beyond the free-page reserve


def _id() -> str:
    return uuid.uuid4().hex


def _done(task_id: str) -> TaskInfo:
    return TaskInfo(task_id, name="f", queue="q", status="success", attempts=1, worker="w:1", result=PAD)


async def _run_tasks(store: SQLiteResultStore | MemoryResultStore, count: int) -> None:
    """Claim and finish ``count`` new tasks, the way a worker does."""
    ids = [_id() for _ in range(count)]
    for chunk in range(0, count, 200):
        part = ids[chunk : chunk + 200]
        await asyncio.gather(*(store.claim(i, name="f", queue="q", worker="w:1", started_at=1.0) for i in part))
        await asyncio.gather(*(store.finish(_done(i)) for i in part))


class FileProbe:
    """Reads a store file from a connection of its own (what any other process sees)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)

    def records(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM taskstream_tasks").fetchone()[0])

    def free_pages(self) -> int:
        return int(self.conn.execute("PRAGMA freelist_count").fetchone()[0])

    def size(self) -> int:
        return self.path.stat().st_size

    def checkpoint(self) -> None:
        """Copy the WAL into the file now, so its size shows the live records (the upkeep thread's own
        checkpoints run every quarter second, and on a loaded machine a round can end before one has)."""
        self.conn.execute("PRAGMA wal_checkpoint(FULL)").fetchall()

    def close(self) -> None:
        self.conn.close()


async def test_sqlite_file_stops_growing_under_a_steady_load_and_shrinks_after_it(tmp_path: Path) -> None:
    path = tmp_path / "steady.sqlite3"
    store = SQLiteResultStore(path, ttl=0.5)
    probe = FileProbe(path)
    per_round = 1500
    sizes: list[int] = []
    try:
        rounds = 12
        for _ in range(rounds):
            await _run_tasks(store, per_round)
            probe.checkpoint()
            sizes.append(probe.size())
            # Steady load: the next round starts once the rounds before this one are gone.
            await wait_for(lambda: probe.records() <= per_round, what="expiry of the earlier rounds")
        # At most two rounds are alive at a time; the file holds about that, not the 72 MB written in all.
        bound = 4 * per_round * len(PAD)
        assert max(sizes) <= bound < rounds * per_round * len(PAD) / 2, f"the file kept growing: {sizes}"

        # The load stops: every record expires, and the upkeep gives the pages back.
        await wait_for(lambda: probe.records() == 0, what="expiry of every record")
        await wait_for(lambda: probe.free_pages() <= 256, what="free pages given back")
        # The upkeep keeps a reserve of free pages and the checkpoint after the vacuum cuts the file back to it.
        kept = (FREE_RESERVE_PAGES + 16) * 4096
        assert max(sizes) > 2 * kept, f"the load never grew the file beyond the reserve: {sizes}"
        await wait_for(lambda: probe.size() <= kept, what=f"the file cut back from {max(sizes)} to {kept} bytes")
    finally:
        probe.close()
        await store.close()


async def test_sqlite_expiry_is_bounded_per_pass(tmp_path: Path) -> None:
    path = tmp_path / "bounded.sqlite3"
    store = SQLiteResultStore(path, ttl=3600.0)
    probe = FileProbe(path)
    total = PURGE_BATCH * PURGE_ROUNDS + 1234
    try:
        await store.add_pending([TaskInfo(_id(), name="f") for _ in range(total)])
        later = 1e12  # every record has expired by then
        first = store.upkeep(now=later)
        assert first.purged == PURGE_BATCH * PURGE_ROUNDS and first.backlog
        assert probe.records() == 1234
        second = store.upkeep(now=later)
        assert second.purged == 1234 and not second.backlog
        assert probe.records() == 0
        assert store.upkeep().purged == 0  # nothing expired now
    finally:
        probe.close()
        await store.close()


async def test_sqlite_expired_records_go_by_themselves(tmp_path: Path) -> None:
    path = tmp_path / "alone.sqlite3"
    store = SQLiteResultStore(path, ttl=0.3)
    probe = FileProbe(path)
    try:
        await _run_tasks(store, 300)
        assert probe.records() == 300
        await wait_for(lambda: probe.records() == 0, what="the upkeep thread's expiry")
    finally:
        probe.close()
        await store.close()


def test_every_query_of_the_sqlite_store_searches_an_index(tmp_path: Path) -> None:
    from taskstream.tasks.stores import sqlite as module

    path = tmp_path / "plans.sqlite3"
    SQLiteResultStore(path)
    conn = sqlite3.connect(path)
    plans = {}
    for name in ("_PENDING", "_CLAIM", "_FINISH", "_REFUSE", "_GET", "_CANCEL"):
        sql = getattr(module, name)
        plans[name] = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?"))]
    plans["purge"] = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + _PURGE, [0.0, 10])]
    conn.close()
    assert not [step for steps in plans.values() for step in steps if step.startswith("SCAN")], plans
    assert plans["_GET"] == ["SEARCH taskstream_tasks USING INDEX sqlite_autoindex_taskstream_tasks_1 (task_id=?)"]
    assert any("taskstream_tasks_expiry (expires_at<?)" in step for step in plans["purge"]), plans["purge"]


async def test_sqlite_file_settings_and_the_synchronous_option(tmp_path: Path) -> None:
    normal = result_store_from_url(f"sqlite:///{tmp_path / 'n.sqlite3'}")
    full = result_store_from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}?synchronous=FULL")
    assert isinstance(normal, SQLiteResultStore) and isinstance(full, SQLiteResultStore)
    try:
        assert normal._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert normal._conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert normal._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert full._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert full.url.endswith("?synchronous=full") and full.path.name == "f.sqlite3"
    finally:
        await normal.close()
        await full.close()
    with pytest.raises(ConfigurationError, match="unknown SQLite result store URL parameter 'fsync'"):
        result_store_from_url(f"sqlite:///{tmp_path / 'x.sqlite3'}?fsync=1")
    with pytest.raises(ConfigurationError, match="synchronous='off' is not one of normal, full"):
        result_store_from_url(f"sqlite:///{tmp_path / 'x.sqlite3'}?synchronous=off")


async def test_an_older_sqlite_file_gets_auto_vacuum_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE filler (x)")  # a file made without auto_vacuum
    conn.commit()
    conn.close()
    store = SQLiteResultStore(path)
    try:
        assert store._conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        await store.finish(_done("kept"))
        assert store.get("kept") is not None
    finally:
        await store.close()


_CRASH = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from taskstream.tasks.stores.base import TaskInfo, result_store_from_url
    store = result_store_from_url(sys.argv[1])
    info = TaskInfo(sys.argv[2], name="f", status="success", result=42, attempts=1)
    asyncio.run(store.finish(info))
    print("recorded", flush=True)  # the worker would publish the reply now, and then it dies
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_recorded_result_survives_the_worker_process_being_killed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    task_id = _id()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _CRASH, url, task_id], capture_output=True, text=True, env=env)
    assert out.returncode == -9 and out.stdout.strip() == "recorded", out.stderr
    store = result_store_from_url(url)
    info = store.get(task_id)
    assert info is not None and info.status == "success" and info.result == 42
    asyncio.run(store.close())


async def test_memory_store_sweeps_a_bounded_number_per_write_and_stays_bounded() -> None:
    store = MemoryResultStore(ttl=0.3)
    first = [_id() for _ in range(500)]
    await store.add_pending([TaskInfo(i, name="f") for i in first])
    assert len(store) == 500
    await wait_for(lambda: store.get(first[-1]) is None, what="expiry")  # the newest one expired
    await store.finish(_done(_id()))
    assert len(store) == 500 - 1 - SWEEP_BATCH + 1  # one dropped by get, SWEEP_BATCH by the write
    sizes = []
    for _ in range(6):  # a steady load: the store holds about a TTL's worth, not everything ever written
        await store.add_pending([TaskInfo(_id(), name="f") for _ in range(300)])
        await wait_for(lambda: store.sweep() >= 0 and len(store) == 0, what="expiry of the round")
        sizes.append(len(store))
    assert sizes == [0] * 6
    assert store.sweep() == 0


@pytest.mark.redis
async def test_every_redis_record_carries_its_ttl_and_goes_by_itself() -> None:
    import redis

    from taskstream.tasks.stores.redis import _PREFIX

    store = result_store_from_url(REDIS_URL, ttl=0.5)
    pending, claimed, finished, cancelled, refused = (_id() for _ in range(5))
    await store.add_pending([TaskInfo(pending, name="f")])
    assert await store.claim(claimed, name="f", queue="q", worker="w", started_at=1.0) is None
    await store.finish(_done(finished))
    assert store.try_cancel(cancelled)
    error = {"type": "TaskRefused", "message": "no", "traceback": ""}
    assert await store.record_refusal(TaskInfo(refused, name="f", status="failed", error=error))
    keys = [_PREFIX + i for i in (pending, claimed, finished, cancelled, refused)]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        ttls = [client.pttl(key) for key in keys]
        assert all(0 < ttl <= 500 for ttl in ttls), ttls
        await wait_for(lambda: client.exists(*keys) == 0, what="Redis expiring the records")
    finally:
        client.close()
        await store.close()


async def test_a_without_rowid_file_is_rebuilt_keeping_only_live_records(tmp_path: Path) -> None:
    path = tmp_path / "layout.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE taskstream_tasks (
            task_id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', queue TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL, submitted_at REAL, started_at REAL, finished_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0, worker TEXT NOT NULL DEFAULT '', result BLOB, error BLOB,
            expires_at REAL NOT NULL, reply_to TEXT NOT NULL DEFAULT ''
        ) WITHOUT ROWID;
        CREATE INDEX taskstream_tasks_expiry ON taskstream_tasks(expires_at);
        INSERT INTO taskstream_tasks (task_id, status, result, expires_at) VALUES ('live', 'success', '7', 4e9);
        INSERT INTO taskstream_tasks (task_id, status, result, expires_at) VALUES ('gone', 'success', '8', 1.0);
        """
    )
    conn.close()
    store = SQLiteResultStore(path)
    probe = FileProbe(path)
    try:
        ddl = probe.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'taskstream_tasks'").fetchone()[0]
        assert "WITHOUT ROWID" not in ddl.upper()
        assert probe.records() == 1 and store.get("live").result == 7  # type: ignore[union-attr]
        await store.finish(_done("live"))
        assert store.get("live").result == PAD  # type: ignore[union-attr]
    finally:
        probe.close()
        await store.close()
