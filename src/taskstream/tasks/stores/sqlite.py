"""The SQLite result store: one file shared by every process on a host (the default for real brokers).

WAL journal and a busy timeout let clients and workers in many processes read and write the same file. The
hot-path writes (``add_pending``, ``claim``, ``finish``) run on the loop's thread, no thread hand-off: while the
store is quiet each write commits at once (tens of microseconds); once writes arrive faster, those made during
one turn of the event loop are committed together in one transaction at the end of that turn, so thousands of
tasks a second cost a few short commits. ``get`` and ``try_cancel`` work from any thread, with or without an
event loop.

Claim and cancel are single UPSERT statements guarded by ``WHERE status IN (...)``: SQLite serialises
writers, so a task is either cancelled before it is claimed or claimed before it is cancelled, never both.

Every statement is an index search (``EXPLAIN QUERY PLAN``): the ``task_id`` index for get, claim, finish,
refusals and cancel; the ``expires_at`` index for expiry. So no statement scans, and a task's cost grows only
with the depth of those indexes (``benchmarks/bench_store.py`` measures it at a million records). Clean pages
are read in place through a memory map of the whole file and the connection keeps only a small cache of its
own (a 16 MiB cache and a 64 MiB map cost more: 54 us of CPU per task at 1M records, 0.75x). The WAL file is
reused, never cut inside a task's commit, and kept bounded by the upkeep (:mod:`.sqlite_upkeep`): the cut and
the regrowth after it were the rest of the difference (0.85-0.87x CPU before; with 1,000,000 records claim +
finish + get now cost the same CPU as empty, 0.97-1.0x in ``bench_store.py``). What remains per task is a new
task's entry in the ``task_id`` index, one page at a random place. Measured and not taken: an index on a 64-bit
integer key from the id (the same cost at 1M records, more when empty: a claim takes two statements) and that
key as the rowid (1.6x the cost at 1M records: whole rows written at random places, as in the WITHOUT ROWID
files before). Expiry, WAL checkpoints and giving free pages back (``auto_vacuum=INCREMENTAL``) run on a thread
of their own, bounded per pass, never inside a task's commit (:mod:`.sqlite_upkeep`): the file holds about a
TTL's worth of records and shrinks when the load drops.

Durability (``synchronous``, the ``?synchronous=`` URL option):

* ``normal`` (default): a commit is in the WAL file before the write returns, so a record written before the
  reply was published survives a crash of the worker process (what at-least-once needs: a redelivered task
  finds its claim or its outcome). The WAL is fsynced at each checkpoint (every quarter second while written);
  after a *power loss* the file is intact but the records of the last moments before it may be gone (their
  tasks read as unknown or as an earlier state; their replies were already sent).
* ``full``: every commit is fsynced (one fsync per batch of writes), so records also survive a power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from taskstream.errors import ConfigurationError
from taskstream.messages import dumps, loads
from taskstream.tasks.errors import ResultStoreError
from taskstream.tasks.stores.base import ResultStore, TaskInfo
from taskstream.tasks.stores.sqlite_upkeep import Upkeep, UpkeepReport
from taskstream.urloptions import Option, URLOptions

__all__ = ["SYNCHRONOUS_LEVELS", "SQLiteResultStore"]

log = logging.getLogger("taskstream.tasks.sqlite")

_TABLE = "taskstream_tasks"
_COLUMNS = (
    "task_id, name, queue, status, submitted_at, started_at, finished_at, attempts, worker, result, error, expires_at, "
    "reply_to"
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    task_id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    queue TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    submitted_at REAL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    result BLOB,
    error BLOB,
    expires_at REAL NOT NULL,
    reply_to TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS {_TABLE}_expiry ON {_TABLE}(expires_at);
"""
# Rows live in rowid order, i.e. in the order tasks were first recorded: a task's claim and finish write near the
# end of the table and expiry deletes from its start, so only the small task_id index is written at random (a
# WITHOUT ROWID table, as files before this one had, wrote whole rows at random places: twice the pages per commit).
# Files made before reply_to existed get the column (existing rows read as '', "submitter unknown").
_ADDED_COLUMNS = (("reply_to", "TEXT NOT NULL DEFAULT ''"),)
_SAME_SUBMITTER = "(reply_to = '' OR reply_to = excluded.reply_to)"
_PENDING = (
    f"INSERT INTO {_TABLE} (task_id, name, queue, status, submitted_at, expires_at, reply_to) "
    "VALUES (?, ?, ?, 'pending', ?, ?, ?) "
    "ON CONFLICT(task_id) DO UPDATE SET name = excluded.name, queue = excluded.queue, status = 'pending', "
    "submitted_at = excluded.submitted_at, expires_at = excluded.expires_at, reply_to = excluded.reply_to "
    "WHERE expires_at < ?"
)
_CLAIM = (
    f"INSERT INTO {_TABLE} (task_id, name, queue, status, submitted_at, started_at, attempts, worker, expires_at, "
    "reply_to) VALUES (?, ?, ?, 'running', ?, ?, 1, ?, ?, ?) "
    "ON CONFLICT(task_id) DO UPDATE SET status = 'running', started_at = excluded.started_at, "
    "attempts = attempts + 1, worker = excluded.worker, expires_at = excluded.expires_at, "
    "name = CASE WHEN name = '' THEN excluded.name ELSE name END, "
    "queue = CASE WHEN queue = '' THEN excluded.queue ELSE queue END, "
    "reply_to = CASE WHEN reply_to = '' THEN excluded.reply_to ELSE reply_to END "
    f"WHERE (status IN ('pending', 'running') AND {_SAME_SUBMITTER}) OR expires_at < ?"
)
_FINISH = (  # the whole record replaced, in place (same rowid: the task_id index is not touched)
    f"INSERT INTO {_TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ") if c != "task_id")
)
_REFUSE = (
    f"INSERT INTO {_TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(task_id) DO UPDATE SET status = excluded.status, finished_at = excluded.finished_at, "
    "worker = excluded.worker, error = excluded.error, result = NULL, expires_at = excluded.expires_at, "
    "name = CASE WHEN name = '' THEN excluded.name ELSE name END, "
    "reply_to = CASE WHEN reply_to = '' THEN excluded.reply_to ELSE reply_to END "
    f"WHERE (status IN ('pending', 'running') AND {_SAME_SUBMITTER}) OR expires_at < ?"
)
_GET = f"SELECT {_COLUMNS} FROM {_TABLE} WHERE task_id = ? AND expires_at >= ?"
_CANCEL = (
    f"INSERT INTO {_TABLE} (task_id, status, finished_at, expires_at) VALUES (?, 'cancelled', ?, ?) "
    "ON CONFLICT(task_id) DO UPDATE SET status = 'cancelled', finished_at = excluded.finished_at, "
    "expires_at = excluded.expires_at WHERE status = 'pending' OR expires_at < ?"
)
# seconds without a commit after which a write commits at once instead of waiting for the turn: tasks run one at
# a time (a round trip takes a millisecond or more) commit inline; under load commits come closer and batch
_QUIET = 0.001

Op = Callable[[sqlite3.Connection], Any]


SYNCHRONOUS_LEVELS = ("normal", "full")
# Clean pages are read in place through the memory map (the OS page cache, shared by every process using the file);
# the connection's own cache holds little more than the pages a transaction changes. At 1,000,000 records a 16 MiB
# cache with a 64 MiB map cost 53-56 us of CPU per task and this pair 46-49 (empty: 40-42 either way): SQLite's
# per-transaction upkeep of its own cache grows with what that cache holds (issue 15, benchmarks/bench_store.py).
_CACHE_KIB = 2 * 1024  # private page cache of the task path's connection
_MMAP_BYTES = 1024 * 1024 * 1024  # the whole file of several million records (file-backed memory, reclaimable)
_VACUUM_ON_OPEN_BYTES = 256 * 1024 * 1024  # older files up to this size are converted to auto_vacuum at open


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in a new file (before its first table)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on the upkeep thread, never in a task's commit
    conn.execute("PRAGMA journal_size_limit=-1")  # the WAL file is reused, never cut in a task's commit (upkeep)
    conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
    return conn


def _enable_auto_vacuum(conn: sqlite3.Connection, path: Path) -> None:
    """Convert a file made before ``auto_vacuum=INCREMENTAL`` (one VACUUM), if it is small enough to do it now."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    if page_size * pages > _VACUUM_ON_OPEN_BYTES:
        log.warning(
            "result store %s was made without auto_vacuum and is too large to convert at open; its size stays "
            "bounded by the TTL but it will not shrink (run VACUUM on it while no worker uses it)",
            path,
        )
        return
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.OperationalError as exc:  # busy: another process holds it; the next open tries again
        log.info("result store %s not converted to auto_vacuum yet: %s", path, exc)


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the table, or add the columns a file made by an older version lacks (safe to race)."""
    conn.executescript(_SCHEMA)
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({_TABLE})")}
    for column, declaration in _ADDED_COLUMNS:
        if column in have:
            continue
        try:
            conn.execute(f"ALTER TABLE {_TABLE} ADD COLUMN {column} {declaration}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc).lower():  # another process added it first
                raise
    if _without_rowid(conn):
        _rebuild_with_rowids(conn)


def _without_rowid(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (_TABLE,)).fetchone()
    return row is not None and "WITHOUT ROWID" in row[0].upper()


def _rebuild_with_rowids(conn: sqlite3.Connection) -> None:
    """Copy the live records of a WITHOUT ROWID table (older versions) into the rowid layout, once, atomically."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _without_rowid(conn):  # another process may have done it while this one waited for the lock
            conn.execute(f"DROP INDEX IF EXISTS {_TABLE}_expiry")
            conn.execute(f"ALTER TABLE {_TABLE} RENAME TO {_TABLE}_old")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                f"INSERT INTO {_TABLE} ({_COLUMNS}) SELECT {_COLUMNS} FROM {_TABLE}_old WHERE expires_at >= ?",
                (time.time(),),
            )
            conn.execute(f"DROP TABLE {_TABLE}_old")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _row_to_info(row: Sequence[Any]) -> TaskInfo:
    (
        task_id,
        name,
        queue_,
        status,
        submitted,
        started,
        finished,
        attempts,
        worker,
        result,
        error,
        expires,
        reply_to,
    ) = row
    return TaskInfo(
        task_id=task_id,
        name=name,
        queue=queue_,
        status=status,
        submitted_at=submitted,
        started_at=started,
        finished_at=finished,
        attempts=attempts,
        worker=worker,
        result=loads(result) if result is not None else None,
        error=loads(error) if error is not None else None,
        expires_at=expires,
        reply_to=reply_to or "",
    )


class SQLiteResultStore(ResultStore):
    """Task records in a SQLite file.

    Args:
        path: the database file (created with its directory when missing).
        ttl: seconds a record is kept after its last write.
        synchronous: ``"normal"`` (a record survives a crash of the process) or ``"full"`` (also a power
            loss); see the module docstring.

    Raises:
        ConfigurationError: ``synchronous`` is not one of :data:`SYNCHRONOUS_LEVELS`.
        ResultStoreError: the file cannot be opened or created.
    """

    #: the URL options :meth:`from_url` reads; any other is refused by name
    OPTIONS: ClassVar[URLOptions] = URLOptions(
        "SQLite result store",
        [Option("synchronous", "str", "normal", "normal: survives a crash of the process; full: also a power loss")],
    )

    @classmethod
    def from_url(cls, url: str, *, ttl: float = 86400.0) -> SQLiteResultStore:
        """The store of ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` (``?synchronous=full``).

        Raises:
            ConfigurationError: the URL names no file, or has an unknown option.
            ResultStoreError: the file cannot be opened or created.
        """
        path, _, query = url.split("://", 1)[-1].partition("?")
        if not path.startswith("/"):
            raise ConfigurationError(f"bad SQLite store URL {url!r}: use sqlite:///relative.db or sqlite:////abs.db")
        path = path[1:]
        if not path:
            raise ConfigurationError(f"SQLite store URL {url!r} names no file")
        return cls(path, ttl=ttl, **cls.OPTIONS.parse(query, url=url))

    def __init__(self, path: str | Path, *, ttl: float = 86400.0, synchronous: str = "normal") -> None:
        synchronous = synchronous.lower()
        if synchronous not in SYNCHRONOUS_LEVELS:
            raise ConfigurationError(
                f"SQLite result store synchronous={synchronous!r} is not one of {', '.join(SYNCHRONOUS_LEVELS)}"
            )
        self.path = Path(path)
        self.ttl = ttl
        self.synchronous = synchronous
        self.url = f"sqlite:///{self.path}" + ("" if synchronous == "normal" else f"?synchronous={synchronous}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(str(self.path), synchronous)
            _migrate(self._conn)
            _enable_auto_vacuum(self._conn, self.path)
        except (sqlite3.Error, OSError) as exc:
            raise ResultStoreError(f"cannot open the SQLite result store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._batch: list[tuple[Op, asyncio.Future[Any]]] = []
        self._last_commit = 0.0  # monotonic time of the last commit: a store quiet for _QUIET commits at once
        self._upkeep = Upkeep(self.path, ttl=ttl, writes=self._lock)
        weakref.finalize(self, self._upkeep.stop_soon)  # a store dropped without close() stops its thread
        self._closed = False

    # -- batched writes ------------------------------------------------------------------------------

    async def _submit(self, op: Op) -> Any:
        if self._closed:
            raise ResultStoreError(f"SQLite result store {self.path} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._batch:
            self._upkeep.touch()
            if time.monotonic() - self._last_commit > _QUIET:
                # A quiet store: commit this write now, in its own short transaction (no loop turn added).
                self._batch.append((op, fut))
                self._commit_batch()
                return fut.result()
            loop.call_soon(self._commit_batch)
        self._batch.append((op, fut))
        return await fut

    def _commit_batch(self) -> None:
        """Run every write queued during this loop turn in one transaction (a few tens of microseconds)."""
        batch, self._batch = self._batch, []
        self._last_commit = time.monotonic()
        results: list[Any] = []
        try:
            with self._lock:
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    results = [op(conn) for op, _ in batch]
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            error = ResultStoreError(f"SQLite result store {self.path}: {exc}")
            error.__cause__ = exc
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        for (_, fut), value in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(value)

    # -- the protocol --------------------------------------------------------------------------------

    async def add_pending(self, records: Sequence[TaskInfo]) -> None:
        if not records:
            return
        now = time.time()
        rows = [(r.task_id, r.name, r.queue, r.submitted_at, now + self.ttl, r.reply_to, now) for r in records]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(_PENDING, rows)

        await self._submit(op)

    async def claim(
        self, task_id: str, *, name: str, queue: str, worker: str, started_at: float, reply_to: str = ""
    ) -> TaskInfo | None:
        now = time.time()
        params = (task_id, name, queue, started_at, started_at, worker, now + self.ttl, reply_to, now)

        def op(conn: sqlite3.Connection) -> TaskInfo | None:
            if conn.execute(_CLAIM, params).rowcount:
                return None
            row = conn.execute(_GET, (task_id, 0.0)).fetchone()
            return _row_to_info(row) if row else None

        result: TaskInfo | None = await self._submit(op)
        return result

    def _row(self, info: TaskInfo, now: float) -> tuple[Any, ...]:
        return (
            info.task_id,
            info.name,
            info.queue,
            info.status,
            info.submitted_at,
            info.started_at,
            info.finished_at,
            info.attempts,
            info.worker,
            dumps(info.result) if info.status == "success" else None,
            dumps(info.error) if info.error is not None else None,
            now + self.ttl,
            info.reply_to,
        )

    async def finish(self, info: TaskInfo) -> None:
        row = self._row(info, time.time())

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_FINISH, row)

        await self._submit(op)

    async def record_refusal(self, info: TaskInfo) -> bool:
        now = time.time()
        params = (*self._row(info, now), now)

        def op(conn: sqlite3.Connection) -> bool:
            return bool(conn.execute(_REFUSE, params).rowcount)

        written: bool = await self._submit(op)
        return written

    def get(self, task_id: str) -> TaskInfo | None:
        try:
            with self._lock:
                row = self._conn.execute(_GET, (task_id, time.time())).fetchone()
        except sqlite3.Error as exc:
            raise ResultStoreError(f"SQLite result store {self.path}: {exc}") from exc
        return _row_to_info(row) if row else None

    def try_cancel(self, task_id: str) -> bool:
        now = time.time()
        self._upkeep.touch()
        try:
            with self._lock:
                return bool(self._conn.execute(_CANCEL, (task_id, now, now + self.ttl, now)).rowcount)
        except sqlite3.Error as exc:
            raise ResultStoreError(f"SQLite result store {self.path}: {exc}") from exc

    def upkeep(self, *, now: float | None = None) -> UpkeepReport:
        """Run one bounded upkeep pass now (the upkeep thread does this by itself while the store is used).

        Deletes at most a few thousand expired records (those that expired before ``now``; default: the
        current time), gives free pages back to the file system and checkpoints the WAL.

        Raises:
            ResultStoreError: the file could not be written.
        """
        try:
            return self._upkeep.run_once(now=now)
        except sqlite3.Error as exc:
            raise ResultStoreError(f"SQLite result store {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batch:
            self._commit_batch()
        await asyncio.to_thread(self._upkeep.stop)
        with self._lock:
            self._conn.close()
