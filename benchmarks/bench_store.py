"""Result store: the cost of a task's store work with 1,000,000 records in the store against an empty one.

Per task the worker's store work is ``claim`` (before running it), ``finish`` (before the reply) and a client's
``get`` by id. Each round runs ``TASKS`` such tasks, eight at a time (the worker's default concurrency), against
an empty store and against a store holding ``RECORDS`` finished records (live, within the TTL), in turn, so a
busy machine slows both alike. Rows (tasks/s; the ratio is 1M / empty, goal >= 0.9):

1. *SQLite*: the full file is filled once through the store's own API; the empty store is one file kept open
   and emptied before each of its rounds, so both stores run with their WAL file already grown, as a running
   worker's store does (``BENCH_STORE_FRESH_EMPTY=1``: a new file for each empty round instead, whose rounds
   then also pay for growing a new WAL file, which favours the full store).
2. *memory*: the embedded broker's store.
3. *Redis* (when a server answers on ``BENCH_REDIS_URL``): keys filled with the store's layout in pipelines,
   in a database of their own, deleted afterwards.

``BENCH_STORE_RECORDS`` changes the size of the full store (default 1,000,000); ``BENCH_STORES`` picks the rows
(comma-separated among ``sqlite,memory,redis``; default all). Each row's ``extra`` also holds the event loop
thread's CPU time per task (medians, microseconds): on a shared machine it varies far less than wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from common import Row, print_rows  # noqa: E402

from taskstream.tasks.stores.base import ResultStore, TaskInfo, result_store_from_url  # noqa: E402
from taskstream.tasks.stores.sqlite import SQLiteResultStore  # noqa: E402

RECORDS = int(os.environ.get("BENCH_STORE_RECORDS", "1000000"))
TASKS = 10_000
CONCURRENCY = 8
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
FILL_CHUNK = 20_000
# SQLite: one empty store emptied before each round (its WAL file already grown, as the full store's is), or
# with BENCH_STORE_FRESH_EMPTY=1 a new file each round (that round also pays for growing a new WAL file)
WARM_EMPTY = os.environ.get("BENCH_STORE_FRESH_EMPTY", "") != "1"
STORES = [name.strip() for name in os.environ.get("BENCH_STORES", "sqlite,memory,redis").split(",") if name.strip()]


def _finished(task_id: str, n: int) -> TaskInfo:
    return TaskInfo(
        task_id,
        name="bench.noop",
        queue="bench-store",
        status="success",
        submitted_at=1.0,
        started_at=2.0,
        finished_at=3.0,
        attempts=1,
        worker="bench-host:1",
        result={"n": n},
        reply_to="bench-reply-0123456789abcdef",
    )


async def fill(store: ResultStore, count: int) -> None:
    """Put ``count`` finished records in ``store`` through its own API (writes of one loop turn batch together)."""
    for start in range(0, count, FILL_CHUNK):
        infos = [_finished(uuid.uuid4().hex, start + i) for i in range(min(FILL_CHUNK, count - start))]
        await asyncio.gather(*(store.finish(info) for info in infos))


def fill_redis(url: str, count: int) -> list[str]:
    """Put ``count`` records in Redis with the store's key layout (pipelined HSET + PEXPIRE); returns the keys."""
    import redis

    from taskstream.tasks.stores.redis import _PREFIX

    client = redis.Redis.from_url(url)
    keys = []
    for start in range(0, count, FILL_CHUNK):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(FILL_CHUNK, count - start)):
            key = _PREFIX + uuid.uuid4().hex
            keys.append(key)
            pipe.hset(
                key,
                mapping={
                    "status": "success",
                    "name": "bench.noop",
                    "queue": "bench-store",
                    "attempts": 1,
                    "worker": "bench-host:1",
                    "result": b'{"n":1}',
                },
            )
            pipe.pexpire(key, 600_000)  # gone within ten minutes even if the run dies
        pipe.execute()
    client.close()
    return keys


async def tasks_per_second(store: ResultStore, tasks: int = TASKS) -> float:
    """Claim, finish and get ``tasks`` new tasks, ``CONCURRENCY`` at a time, as a worker and a client would."""
    ids = iter([uuid.uuid4().hex for _ in range(tasks)])

    async def lane() -> None:
        for task_id in ids:
            blocker = await store.claim(
                task_id, name="bench.noop", queue="bench-store", worker="bench-host:1", started_at=time.time()
            )
            assert blocker is None
            await store.finish(_finished(task_id, 0))
            info = store.get(task_id)
            assert info is not None and info.status == "success"

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return tasks / (time.perf_counter() - started)


async def _rounds(
    label: str,
    make_empty: Callable[[], ResultStore],
    full: ResultStore,
    repeats: int,
    empty_again: Callable[[ResultStore], Awaitable[None]] | None = None,
) -> Row:
    """Alternate a round on an empty store and a round on ``full``; closes ``full`` at the end.

    The empty store is a new one each round, or with ``empty_again`` one store emptied by it before each round.
    """
    empty_rates: list[float] = []
    full_rates: list[float] = []
    empty_cpu: list[float] = []
    full_cpu: list[float] = []
    kept = make_empty() if empty_again is not None else None
    try:
        for _ in range(repeats):
            empty = make_empty() if kept is None else kept
            if empty_again is not None:
                await empty_again(empty)
            try:
                started = time.thread_time()
                empty_rates.append(await tasks_per_second(empty))
                empty_cpu.append((time.thread_time() - started) / TASKS * 1e6)
            finally:
                if kept is None:
                    await empty.close()
            started = time.thread_time()
            full_rates.append(await tasks_per_second(full))
            full_cpu.append((time.thread_time() - started) / TASKS * 1e6)
    finally:
        await full.close()
        if kept is not None:
            await kept.close()
    return Row(
        workload=f"{label} store: claim+finish+get at {RECORDS:,} records",
        subject=f"taskstream {label} store, {RECORDS:,} records",
        baseline="the same store empty",
        unit="tasks/s",
        values=full_rates,
        baseline_values=empty_rates,
        target=0.9,
        notes=f"{TASKS:,} tasks per round, {CONCURRENCY} at a time; rounds alternate empty and full",
        extra={
            "cpu_us_per_task_empty": round(statistics.median(empty_cpu), 1),
            "cpu_us_per_task_full": round(statistics.median(full_cpu), 1),
            "cpu_ratio": round(statistics.median(empty_cpu) / statistics.median(full_cpu), 2),
        },
    )


async def measure_sqlite(repeats: int) -> Row:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        path = Path(tmp) / "full.sqlite3"
        full = SQLiteResultStore(path)
        started = time.perf_counter()
        await fill(full, RECORDS)
        await asyncio.to_thread(full.upkeep)  # checkpoint the fill's WAL, as the upkeep thread would soon
        filled = time.perf_counter() - started
        empty_path = Path(tmp) / "empty.sqlite3"

        async def empty_again(store: ResultStore) -> None:
            """Delete every record, then an upkeep pass (the WAL copied into the file, free pages returned)."""
            assert isinstance(store, SQLiteResultStore)
            with sqlite3.connect(empty_path, isolation_level=None) as conn:
                conn.execute("DELETE FROM taskstream_tasks")
            conn.close()
            await asyncio.to_thread(store.upkeep)

        counter = iter(range(10**9))

        def make_empty() -> ResultStore:
            if WARM_EMPTY:
                return SQLiteResultStore(empty_path)
            return result_store_from_url(f"sqlite:///{Path(tmp) / f'empty-{next(counter)}.sqlite3'}")

        size = path.stat().st_size
        row = await _rounds("SQLite", make_empty, full, repeats, empty_again if WARM_EMPTY else None)
        row.extra |= {"fill_seconds": round(filled, 1), "file_mib": round(size / 2**20, 1)}
        return row


async def measure_memory(repeats: int) -> Row:
    from taskstream.tasks.stores.memory import MemoryResultStore

    full = MemoryResultStore()
    await fill(full, RECORDS)
    return await _rounds("memory", MemoryResultStore, full, repeats)


async def measure_redis(repeats: int) -> Row | None:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:  # no server here: the row is left out, the others still run
        print(f"    redis row skipped: {type(exc).__name__}", flush=True)
        return None
    keys = await asyncio.to_thread(fill_redis, REDIS_URL, RECORDS)
    empty_url = REDIS_URL.rsplit("/", 1)[0] + "/13"
    try:
        return await _rounds(
            "Redis",
            lambda: result_store_from_url(empty_url, ttl=600.0),
            result_store_from_url(REDIS_URL, ttl=600.0),
            repeats,
        )
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for start in range(0, len(keys), FILL_CHUNK):
            with contextlib.suppress(redis.RedisError):
                client.unlink(*keys[start : start + FILL_CHUNK])
        client.close()


def measure(repeats: int = 3) -> list[Row]:
    rows: list[Row] = []
    if "sqlite" in STORES:
        rows.append(asyncio.run(measure_sqlite(repeats)))
    if "memory" in STORES:
        rows.append(asyncio.run(measure_memory(repeats)))
    redis_row = asyncio.run(measure_redis(repeats)) if "redis" in STORES else None
    return rows + ([redis_row] if redis_row is not None else [])


if __name__ == "__main__":
    measured = measure(int(os.environ.get("BENCH_REPEATS", "3")))
    print_rows(measured)
    for row in measured:
        ratios = sorted(full / empty for full, empty in zip(row.values, row.baseline_values, strict=True))
        print(
            f"{row.workload}: full rounds {[round(v) for v in row.values]}, empty rounds "
            f"{[round(v) for v in row.baseline_values]}, ratio of medians {row.ratio:.2f}, per-round ratios "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f} {row.extra}"
        )
