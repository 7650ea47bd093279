"""Upkeep of a SQLite result store file: expiry, WAL checkpoints and shrinking, off the task path.

Where the time of the SQLite store went (issue 15, measured with py-spy and per-statement timers on a
20,000-task claim + finish + get loop): every statement the store runs is an index search (``EXPLAIN QUERY
PLAN``: the primary key for get/claim/finish/cancel, the ``expires_at`` index for expiry), so the size of the
table was not the problem. The problem was work that ran *inside* a task's commit on the event loop:

* SQLite's automatic WAL checkpoint: every thousandth page written, one commit copied the WAL into the
  database and fsynced it. One commit in a hundred took 10-50 ms instead of 35 us, about a third of all
  the time spent in the store, and more the larger and colder the file;
* the expiry ``DELETE ... WHERE expires_at < now`` ran unbounded in a commit once a minute, so after a day of
  records the first task of each minute deleted a minute's worth of yesterday's rows;
* the file never shrank (no auto-vacuum), so its pages were spread over a file that only grew.

:class:`Upkeep` moves all three to a thread of its own with its own connection. The task path's connection
never checkpoints (``wal_autocheckpoint=0``). The thread, every :data:`CHECKPOINT_EVERY` seconds while
writes arrive:

1. deletes expired records in batches of :data:`PURGE_BATCH` (each batch one short transaction, at most
   :data:`PURGE_ROUNDS` batches per pass; a backlog is worked off pass by pass), every ``purge_every``
   seconds (a quarter of the TTL, at most :data:`PURGE_EVERY`);
2. gives free pages back to the file system with ``PRAGMA incremental_vacuum`` (``auto_vacuum=INCREMENTAL``),
   keeping a reserve of free pages for the next inserts, at most :data:`VACUUM_PAGES` pages per pass;
3. checkpoints the WAL (``PASSIVE``: it never waits for, nor blocks, a writer or a reader);
4. keeps the WAL bounded. SQLite starts the WAL over from its beginning only at a write that finds every frame
   copied into the database, which under a steady load never happens: the writer adds frames while a passive
   checkpoint copies the earlier ones. At 20,000 tasks/s the WAL grew by about 200 MiB a second, to 1.5 GB in
   7 s, and throughput halved (every page read searches the WAL's index, one hash table per 4,096 frames).
   Once the WAL holds more than :data:`WAL_CATCH_UP_BYTES`, the pass copies the frames written during its
   passive checkpoint while holding the store's write lock, so the next write starts the WAL over. This
   process's writers wait on a thread lock meanwhile (not on SQLite's busy sleeps): on a 1,000,000-record file
   50-70 ms, mostly the fsync of the pages copied, hence the large threshold (under a full load one such wait
   every second or so; with 16 or 64 MiB, one every pass, for no steadier throughput). The task path's
   connection never cuts the WAL file back (``journal_size_limit=-1``): a cut was an ``ftruncate`` of tens of
   MiB inside a task's commit, then the file regrown block by block by the next commits (about 6 us of CPU per
   task on a busy 1M-record store); its blocks are reused instead. When the store has been quiet for a pass,
   the WAL file is cut to nothing if it is larger than :data:`WAL_KEEP_BYTES`.

So the file holds at most about a TTL's worth of records plus the reserve, and shrinks when the load drops.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINT_EVERY",
    "PURGE_BATCH",
    "PURGE_EVERY",
    "PURGE_ROUNDS",
    "VACUUM_PAGES",
    "WAL_CATCH_UP_BYTES",
    "WAL_KEEP_BYTES",
    "Upkeep",
    "UpkeepReport",
    "purge_interval",
]

log = logging.getLogger("taskstream.tasks.sqlite")

CHECKPOINT_EVERY = 0.25  # seconds between passes while the store is written
PURGE_EVERY = 5.0  # at most this many seconds between expiry runs (a quarter of the TTL when shorter)
PURGE_BATCH = 500  # expired records deleted per transaction
PURGE_ROUNDS = 20  # transactions per pass: at most PURGE_BATCH * PURGE_ROUNDS deletions per pass
VACUUM_PAGES = 4096  # pages given back to the file system per pass (16 MiB of 4 KiB pages)
FREE_RESERVE_PAGES = 256  # free pages kept for the next inserts (plus an eighth of the file)
WAL_CATCH_UP_BYTES = 256 * 1024 * 1024  # a larger WAL is brought to a complete checkpoint, its writers held
WAL_KEEP_BYTES = 16 * 1024 * 1024  # a quiet store's WAL file larger than this is cut to nothing
_WAL_FRAME_HEADER = 24  # bytes before each page in the WAL file
_QUIET_BUSY_MS = 50  # how long the quiet cut waits for another process's reader or writer before giving up

_TABLE = "taskstream_tasks"
_PURGE = (
    f"DELETE FROM {_TABLE} WHERE task_id IN "
    f"(SELECT task_id FROM {_TABLE} WHERE expires_at < ? ORDER BY expires_at LIMIT ?)"
)


def purge_interval(ttl: float) -> float:
    """Seconds between expiry runs for a store whose records live ``ttl`` seconds."""
    return max(CHECKPOINT_EVERY, min(PURGE_EVERY, ttl / 4))


@dataclass(frozen=True, slots=True)
class UpkeepReport:
    """What one upkeep pass did.

    Attributes:
        purged: expired records deleted.
        vacuumed: free pages given back to the file system.
        backlog: whether expired records were left for the next pass (the per-pass bound was reached).
    """

    purged: int = 0
    vacuumed: int = 0
    backlog: bool = False


class Upkeep:
    """Expiry, checkpoints and shrinking of one result store file, on a daemon thread (see the module docstring).

    Args:
        path: the database file.
        ttl: the store's record lifetime in seconds (sets how often expiry runs).
        writes: the lock the store's writers in this process hold for each commit; held while a checkpoint
            catches up with them (see the module docstring). Without it the WAL is only checkpointed passively.
    """

    def __init__(self, path: Path, *, ttl: float, writes: threading.Lock | None = None) -> None:
        self.path = path
        self._writes = writes
        self.purge_every = purge_interval(ttl)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0
        self._started = threading.Lock()
        self._pid = os.getpid()
        self._page_bytes = 0

    def touch(self) -> None:
        """Note a write (the thread runs only while the store is written); starts the thread on first use."""
        if not self._dirty.is_set():  # set() takes a lock and notifies: once per pass is enough
            self._dirty.set()
        if self._pid != os.getpid():  # a forked child: the thread and the connection stayed in the parent
            self._pid, self._thread, self._conn = os.getpid(), None, None
        if self._thread is None and not self._stop.is_set():
            with self._started:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name=f"taskstream-store-upkeep:{self.path.name}", daemon=True
                    )
                    self._thread.start()

    def run_once(self, *, now: float | None = None, purge: bool = True, quiet: bool = False) -> UpkeepReport:
        """Run one bounded pass now, on the calling thread: expiry (when ``purge``), shrink, checkpoint.

        ``quiet``: the store has not been written since the last pass; a WAL file larger than
        :data:`WAL_KEEP_BYTES` is then cut to nothing.

        Raises:
            sqlite3.Error: the file could not be written (the thread logs these and tries again later).
        """
        with self._lock:
            conn = self._connection()
            purged, backlog, vacuumed = 0, False, 0
            if purge:
                cutoff = time.time() if now is None else now
                for _ in range(PURGE_ROUNDS):
                    deleted = conn.execute(_PURGE, (cutoff, PURGE_BATCH)).rowcount
                    purged += max(deleted, 0)
                    backlog = deleted >= PURGE_BATCH
                    if not backlog:
                        break
                vacuumed = _shrink(conn)
            # frames: the WAL's length when the checkpoint began (all copied unless a reader still needs some)
            frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
            if quiet:
                self._cut_wal(conn)
            elif self._writes is not None and frames * (self._page_size(conn) + _WAL_FRAME_HEADER) > WAL_CATCH_UP_BYTES:
                with self._writes:  # the remainder: what was written during the passive checkpoint
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            return UpkeepReport(purged=purged, vacuumed=vacuumed, backlog=backlog)

    def _page_size(self, conn: sqlite3.Connection) -> int:
        if self._page_bytes == 0:
            self._page_bytes = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return self._page_bytes

    def _cut_wal(self, conn: sqlite3.Connection) -> None:
        """Cut a large WAL file of a quiet store to nothing (gives up at once if another process is at work)."""
        try:
            size = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        if size <= WAL_KEEP_BYTES:
            return
        conn.execute(f"PRAGMA busy_timeout={_QUIET_BUSY_MS}")
        try:
            if self._writes is not None:
                with self._writes:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            else:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.execute("PRAGMA busy_timeout=10000")

    def stop(self) -> None:
        """Stop the thread after a last checkpoint, and close its connection. Idempotent."""
        self.stop_soon()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30.0)
        self._close_connection()

    def stop_soon(self) -> None:
        """Ask the thread to stop without waiting for it (it closes its connection as it leaves)."""
        self._stop.set()
        self._dirty.set()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._conn = conn
        return self._conn

    def _loop(self) -> None:
        while not self._stop.is_set():
            written = self._dirty.wait(self.purge_every)
            if written:
                self._stop.wait(CHECKPOINT_EVERY)  # let a quarter second of writes gather in the WAL
            if self._stop.is_set():
                break
            self._dirty.clear()
            now = time.time()
            purge = now >= self._next_purge
            try:
                report = self.run_once(now=now, purge=purge, quiet=not written)
            except sqlite3.Error as exc:
                log.warning("result store upkeep of %s failed (tried again later): %s", self.path, exc)
                continue
            if purge:
                self._next_purge = now + self.purge_every
            if report.backlog:  # expired records remain: the next pass comes back for them
                self._next_purge = now
                self._dirty.set()
        self._close_connection()

    def _close_connection(self) -> None:
        """A last checkpoint, then close the thread's connection."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.debug("last checkpoint of %s failed: %s", self.path, exc)
                self._conn.close()
                self._conn = None


def _shrink(conn: sqlite3.Connection) -> int:
    """Give free pages beyond the reserve back to the file system; returns how many (bounded per call)."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
        return 0
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    excess = free - max(FREE_RESERVE_PAGES, (pages - free) // 8)
    if excess <= 0:
        return 0
    count = min(excess, VACUUM_PAGES)
    # executescript steps the pragma to its end; execute() would free one page per call.
    conn.executescript(f"PRAGMA incremental_vacuum({int(count)});")
    return int(count)
