"""Sinks (JSON Lines, SQLite, callbacks, stdout, queues) and state stores (SQLite, Redis, memory)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

import taskstream.stream_ops.state as state_module
from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.messages import decode
from taskstream.schemes import Backend
from taskstream.stream_ops import (
    CallbackSink,
    JsonLinesSink,
    Pipeline,
    QueueSink,
    RedisStateStore,
    SQLiteSink,
    SQLiteStateStore,
    StdoutSink,
    state_store_from_url,
)
from taskstream.stream_ops.state import MemoryStateStore, StateStore


async def test_json_lines_sink_appends_lines_and_keyed_items(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.jsonl"
    p = Pipeline("jsonl-out")
    src = p.source("n", range(4))
    src.sink(JsonLinesSink(path))
    src.key_by(lambda n: "k").sink(JsonLinesSink(path))
    await p.run()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert sorted(x for x in lines if isinstance(x, int)) == [0, 1, 2, 3]
    assert sorted(x["value"] for x in lines if isinstance(x, dict)) == [0, 1, 2, 3]


async def test_sqlite_sink_columns_and_upsert_by_primary_key(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    rows = [{"id": 1, "v": "a", "extra": {"x": 1}}, {"id": 2, "v": "b"}, {"id": 1, "v": "a2"}]
    p = Pipeline("sqlite-out")
    p.source("rows", rows).sink(SQLiteSink(db, "t", columns=["id", "v", "extra"], primary_key=["id"]))
    p.source("more", [5, 6]).key_by(str).sink(SQLiteSink(db, "kv"))
    await p.run()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT id, v, extra FROM t ORDER BY id").fetchall() == [(1, "a2", None), (2, "b", None)]
        assert sorted(conn.execute("SELECT key, value FROM kv").fetchall()) == [("5", "5"), ("6", "6")]
    with pytest.raises(ConfigurationError, match="identifier"):
        SQLiteSink(db, "bad table")
    with pytest.raises(ConfigurationError, match="primary_key"):
        SQLiteSink(db, "t", columns=["a"], primary_key=["b"])


async def test_callback_sinks_sync_async_and_per_batch(capsys: pytest.CaptureFixture[str]) -> None:
    got: list[Any] = []
    batches: list[int] = []

    async def slow(x: Any) -> None:
        await asyncio.sleep(0)
        got.append(("async", x))

    p = Pipeline("callbacks")
    src = p.source("n", range(5))
    src.sink(CallbackSink(lambda x: got.append(("sync", x))))
    src.sink(CallbackSink(slow))
    src.sink(CallbackSink(lambda items: batches.append(len(items)), per_batch=True))
    src.map(lambda x: {"n": x}).sink(StdoutSink(prefix="> "))
    await p.run()
    assert sorted(got) == sorted([("sync", i) for i in range(5)] + [("async", i) for i in range(5)])
    assert sum(batches) == 5
    assert capsys.readouterr().out.splitlines() == [f'> {{"n":{i}}}' for i in range(5)]


async def test_queue_sink_publishes_envelopes_with_keys() -> None:
    hub = f"qsink-{uuid.uuid4().hex[:6]}"
    broker = MemoryBroker(hub)
    p = Pipeline("queue-out")
    p.source("n", ["a", "b"]).key_by(lambda s: s.upper()).sink(QueueSink("results"))
    await p.run(broker)
    await broker.connect()
    sub = broker.consume("results")
    got = []
    async with asyncio.timeout(5):
        for _ in range(2):
            d = await sub.__anext__()
            env = decode(d.body)
            got.append((env.key, env.body, env.kind))
    assert got == [("A", "a", "record"), ("B", "b", "record")]


async def check_store(store: StateStore) -> None:
    ns = f"test/{uuid.uuid4().hex[:8]}/0"
    assert await store.load(ns) == {}
    await store.commit(ns, {"meta": {"counts": {"a/0": 3}}, "n\x1fwin\x1fs1": {"wm": 1.5, "open": [[1, 2, [3, 4.5]]]}})
    await store.commit(ns, {"n\x1fwin\x1fs2": [1], "n\x1fwin\x1fs1": None})
    assert await store.load(ns) == {"meta": {"counts": {"a/0": 3}}, "n\x1fwin\x1fs2": [1]}
    await store.clear(ns)
    assert await store.load(ns) == {}
    await store.close()


async def test_sqlite_state_store(tmp_path: Path) -> None:
    await check_store(SQLiteStateStore(tmp_path / "state.db"))
    # two stores on one file (two replicas on one machine) see each other's commits
    a, b = SQLiteStateStore(tmp_path / "s.db"), SQLiteStateStore(tmp_path / "s.db")
    await a.commit("ns", {"k": 1})
    assert await b.load("ns") == {"k": 1}
    await a.close()
    await b.close()


async def test_memory_state_store() -> None:
    await check_store(MemoryStateStore())


@pytest.mark.redis
async def test_redis_state_store() -> None:
    await check_store(RedisStateStore("redis://127.0.0.1:6379/0"))


def test_state_store_urls(tmp_path: Path) -> None:
    assert isinstance(state_store_from_url(f"sqlite:///{tmp_path}/x.db"), SQLiteStateStore)
    assert isinstance(state_store_from_url("memory://"), MemoryStateStore)
    with pytest.raises(ConfigurationError, match="unknown state store"):
        state_store_from_url("postgres://u:secret@h/db")
    try:
        state_store_from_url("postgres://u:secret@h/db")
    except ConfigurationError as exc:
        assert "secret" not in str(exc)


def test_a_mistyped_state_store_scheme_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match=r"scheme 'redi' .*did you mean redis://\?") as info:
        state_store_from_url("redi://:secret@127.0.0.1:6379/0")
    assert "secret" not in str(info.value)


def test_a_missing_redis_names_its_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # importing it now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'taskstream[redis]'")):
        state_store_from_url("redis://127.0.0.1:6379/0")


def test_a_table_entry_whose_library_is_missing_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Backend("taskstream.stream_ops.etcd:EtcdStateStore", "etcd state store", "etcd", "no_such_etcd", "etcd3")
    monkeypatch.setitem(state_module._STORES, "etcd", entry)
    with pytest.raises(MissingExtraError, match=r"etcd state store .*'etcd3'.*pip install 'taskstream\[etcd\]'"):
        state_store_from_url("etcd://127.0.0.1:2379")


def test_the_state_store_factory_imports_no_backend() -> None:
    """state.py finds its stores through a scheme table (module:Class strings): no driver or backend module is
    imported at module level, and the factory itself imports nothing."""
    tree = ast.parse(Path(state_module.__file__).read_text(encoding="utf-8"))
    top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    }
    assert not {name for name in top if name and (name.startswith("taskstream.stream_ops.") or name == "redis")}
    factory = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "state_store_from_url")
    assert not [node for node in ast.walk(factory) if isinstance(node, ast.Import | ast.ImportFrom)]


def test_example_readers_close_their_sqlite_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples import fifo_components, sensor_windows

    db = tmp_path / "results.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"CREATE TABLE windows (_ts REAL, {', '.join(sensor_windows.WINDOW_COLUMNS)})")
        conn.execute(f"CREATE TABLE late (_ts REAL, {', '.join(sensor_windows.LATE_COLUMNS)})")
        conn.execute(f"CREATE TABLE results (_ts REAL, {', '.join(fifo_components.COLUMNS)})")
        conn.commit()
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def tracked(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", tracked)
    assert sensor_windows.read_results(db) == ([], [])
    assert fifo_components.read_table(db) == []
    assert len(opened) == 2
    for conn in opened:  # a `with sqlite3.connect()` block commits but leaves the connection open
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
