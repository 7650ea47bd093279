"""Result stores (memory, SQLite, Redis): claim/cancel atomicity, add_pending never overwrites, expiry."""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import taskstream.tasks.stores.base as stores_base
from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.schemes import Backend
from taskstream.tasks.stores.base import ResultStore, TaskInfo, result_store_from_url
from taskstream.tasks.stores.memory import MemoryResultStore
from tests.support.names import unique
from tests.support.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[type]:
    made: list[ResultStore] = []

    def make(ttl: float = 3600.0) -> ResultStore:
        if request.param == "memory":
            store: ResultStore = MemoryResultStore(ttl=ttl)
        elif request.param == "sqlite":
            store = result_store_from_url(f"sqlite:///{tmp_path / 'r.sqlite3'}", ttl=ttl)
        else:
            store = result_store_from_url(REDIS_URL, ttl=ttl)
        made.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in made:
        await store.close()


def _id() -> str:
    return uuid.uuid4().hex


async def test_lifecycle_pending_running_success(make_store: type) -> None:
    store: ResultStore = make_store()
    task_id = _id()
    await store.add_pending([TaskInfo(task_id, name="pi", queue="q", submitted_at=1.0)])
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]
    assert await store.claim(task_id, name="pi", queue="q", worker="w:1", started_at=2.0) is None
    running = store.get(task_id)
    assert running is not None and running.status == "running" and running.attempts == 1
    assert running.started_at == 2.0 and running.worker == "w:1" and running.name == "pi"
    # A redelivery after a crash may claim a running task again.
    assert await store.claim(task_id, name="pi", queue="q", worker="w:2", started_at=3.0) is None
    assert store.get(task_id).attempts == 2  # type: ignore[union-attr]
    done = TaskInfo(
        task_id,
        name="pi",
        queue="q",
        status="success",
        submitted_at=1.0,
        started_at=3.0,
        finished_at=4.0,
        attempts=2,
        worker="w:2",
        result={"pi": [3.14, b"raw"]},
    )
    await store.finish(done)
    got = store.get(task_id)
    assert got is not None and got.status == "success" and got.outcome() == {"pi": [3.14, b"raw"]}
    # Finished: a duplicate delivery is not run again, and it cannot be cancelled.
    blocker = await store.claim(task_id, name="pi", queue="q", worker="w:3", started_at=5.0)
    assert blocker is not None and blocker.status == "success" and blocker.result == {"pi": [3.14, b"raw"]}
    assert not store.try_cancel(task_id)


async def test_cancel_wins_over_a_later_claim_and_pending_never_overwrites(make_store: type) -> None:
    store: ResultStore = make_store()
    queued, unknown, started = _id(), _id(), _id()
    await store.add_pending([TaskInfo(queued, name="a"), TaskInfo(started, name="b")])
    assert store.try_cancel(queued)
    assert store.try_cancel(unknown)  # cancelled before its pending record arrived
    await store.add_pending([TaskInfo(unknown, name="late")])
    assert store.get(unknown).status == "cancelled"  # type: ignore[union-attr]
    blocker = await store.claim(queued, name="a", queue="q", worker="w", started_at=1.0)
    assert blocker is not None and blocker.status == "cancelled"
    assert await store.claim(started, name="b", queue="q", worker="w", started_at=1.0) is None
    assert not store.try_cancel(started)
    await store.add_pending([TaskInfo(started, name="b")])
    assert store.get(started).status == "running"  # type: ignore[union-attr]


async def test_failed_record_keeps_the_error(make_store: type) -> None:
    store: ResultStore = make_store()
    task_id = _id()
    error = {"type": "KeyError", "message": "'x'", "traceback": "Traceback ..."}
    await store.finish(TaskInfo(task_id, name="f", status="failed", finished_at=2.0, error=error))
    info = store.get(task_id)
    assert info is not None and info.error == error
    with pytest.raises(KeyError):
        info.outcome()


async def test_records_expire_after_the_ttl(make_store: type) -> None:
    ttl = 1.5  # long enough that a loaded machine still reads the record before it expires
    store: ResultStore = make_store(ttl=ttl)
    task_id = _id()
    written = time.time()
    await store.finish(TaskInfo(task_id, name="f", status="success", result=1))
    kept = store.get(task_id)
    assert kept is not None and kept.result == 1
    await wait_for(lambda: store.get(task_id) is None, what="the record to expire", timeout=30)
    assert time.time() >= written + ttl  # gone, but not before its ttl ran out
    assert store.try_cancel(task_id)  # an expired record is as good as unknown


async def test_many_concurrent_writes_batch_correctly(make_store: type) -> None:
    store: ResultStore = make_store()
    ids = [_id() for _ in range(300)]
    await store.add_pending([TaskInfo(i, name="n") for i in ids])
    claims = await asyncio.gather(*(store.claim(i, name="n", queue="q", worker="w", started_at=1.0) for i in ids))
    assert claims == [None] * len(ids)
    await asyncio.gather(*(store.finish(TaskInfo(i, name="n", status="success", result=n)) for n, i in enumerate(ids)))
    assert [store.get(i).result for i in ids] == list(range(300))  # type: ignore[union-attr]


def test_sqlite_store_is_shared_by_processes(tmp_path: Path) -> None:
    """Another process (another client) sees records and its cancel is seen here."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    store = result_store_from_url(url)
    mine, theirs = _id(), _id()
    asyncio.run(store.add_pending([TaskInfo(mine, name="mine"), TaskInfo(theirs, name="theirs")]))
    script = (
        "import sys; from taskstream.tasks.stores.base import result_store_from_url\n"
        "s = result_store_from_url(sys.argv[1]); print(s.get(sys.argv[2]).name, s.try_cancel(sys.argv[3]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, url, mine, theirs], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["mine", "True"]
    assert store.get(theirs).status == "cancelled"  # type: ignore[union-attr]
    asyncio.run(store.close())


def test_store_urls_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="known: memory, sqlite, redis"):
        result_store_from_url("mongodb://x")
    with pytest.raises(ConfigurationError, match="names no file"):
        result_store_from_url("sqlite:///")
    with pytest.raises(ConfigurationError, match="positive"):
        result_store_from_url("memory://", ttl=0)
    assert "secret" not in repr(result_store_from_url("redis://:secret@127.0.0.1:6379/0"))


def test_a_mistyped_scheme_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match=r"scheme 'sqlit' .*did you mean sqlite://\?") as info:
        result_store_from_url("sqlit://:secret@/r.db")
    assert "secret" not in str(info.value)


def test_a_missing_redis_names_its_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # importing it now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'taskstream[redis]'")):
        result_store_from_url(REDIS_URL)


def test_a_table_entry_whose_library_is_missing_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Backend(
        "taskstream.tasks.stores.etcd:EtcdResultStore", "etcd result store", "etcd", "no_such_etcd", "etcd3"
    )
    monkeypatch.setitem(stores_base._STORES, "etcd", entry)
    with pytest.raises(MissingExtraError, match=r"etcd result store .*'etcd3'.*pip install 'taskstream\[etcd\]'"):
        result_store_from_url("etcd://127.0.0.1:2379")


def test_a_store_of_your_own_needs_no_from_url() -> None:
    """``from_url`` is not abstract: a store passed to the App as an instance keeps working without one."""
    assert "from_url" not in ResultStore.__abstractmethods__
    with pytest.raises(ConfigurationError, match="ResultStore is not built from a URL"):
        ResultStore.from_url("own://")


def test_the_factory_imports_no_backend() -> None:
    """base.py finds the stores through its scheme table (module:Class strings), so no base <-> backend cycle."""
    tree = ast.parse(Path(stores_base.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    backends = {name for name in imported if name and name.startswith("taskstream.tasks.stores.")}
    assert not backends and not {name for name in imported if name and name.split(".")[0] in ("redis", "sqlite3")}


def test_memory_stores_are_shared_by_name() -> None:
    url = f"memory://{unique('hub')}"
    a = result_store_from_url(url)
    assert result_store_from_url(url) is a
    assert result_store_from_url("memory://") is not result_store_from_url("memory://")
    task_id = _id()
    asyncio.run(a.finish(TaskInfo(task_id, name="f", status="success", result=7)))
    shared = result_store_from_url(url).get(task_id)
    assert shared is not None and shared.status == "success" and shared.result == 7
    assert result_store_from_url("memory://").get(task_id) is None  # an anonymous store shares nothing


@pytest.mark.redis
async def test_apps_share_task_status_through_redis() -> None:
    """Two clients on (potentially) different hosts: one submits, the other reads status and result by id."""
    from taskstream import App
    from tests.tasks import library
    from tests.tasks.conftest import quick_settings

    app = App(settings=quick_settings(), result_store=REDIS_URL)
    add = app.task(library.add)
    async with app:
        fut = add.submit(19, 23)
        assert await fut == 42
    other = App(settings=quick_settings(), result_store=REDIS_URL)
    info = other.get_task(fut.task_id)
    assert info.status == "success" and info.result == 42 and info.started_at is not None
    await other.tasks.store.close()


async def test_sqlite_stores_sharing_a_file_larger_than_their_page_cache_read_each_others_records(
    tmp_path: Path,
) -> None:
    from taskstream.tasks.stores.sqlite import SQLiteResultStore

    path = tmp_path / "shared.sqlite3"
    writer, reader = SQLiteResultStore(path), SQLiteResultStore(path)
    try:
        cache_kib = -int(writer._conn.execute("PRAGMA cache_size").fetchone()[0])
        pad = "x" * 2000
        ids = [uuid.uuid4().hex for _ in range(3 * cache_kib // 2)]  # about 3 KiB each: thrice the page cache
        for task_id in ids:
            await writer.claim(task_id, name="f", queue="q", worker="w:1", started_at=1.0)
        await asyncio.gather(
            *(
                writer.finish(TaskInfo(i, name="f", queue="q", status="success", attempts=1, result=[i, pad]))
                for i in ids
            )
        )
        assert path.stat().st_size + (tmp_path / "shared.sqlite3-wal").stat().st_size > 2 * cache_kib * 1024
        # The reader's clean pages come through its memory map of the file, the latest ones from the WAL.
        assert int(reader._conn.execute("PRAGMA mmap_size").fetchone()[0]) >= 2**30
        for task_id in ids[:: len(ids) // 50]:
            info = reader.get(task_id)
            assert info is not None and info.status == "success" and info.result == [task_id, pad]
        reader.upkeep()  # the WAL copied into the file: now every page is read through the map
        assert all(reader.get(i).result == [i, pad] for i in ids[:: len(ids) // 50])  # type: ignore[union-attr]
        assert await reader.claim(ids[0], name="f", queue="q", worker="w:2", started_at=2.0) is not None
    finally:
        await writer.close()
        await reader.close()
