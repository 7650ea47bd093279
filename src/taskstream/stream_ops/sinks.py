"""Sinks: where items leave a pipeline.

A :class:`Sink` is a factory: each runtime (the fused run, or each stage replica) calls ``open(ctx)`` and gets
its own :class:`SinkWriter`, whose ``write(items)`` is awaited before the items' input is acked.

==================  ==========================================================================================
Sink                Writes
==================  ==========================================================================================
``QueueSink``       taskstream envelopes to a queue (keyed items carry their key; large ones by reference)
``JsonLinesSink``   one JSON line per item, appended (replicas of one machine may share the file)
``SQLiteSink``      one row per item: columns from dict fields, or ``key``/``value`` JSON; upserts on ``primary_key``
``CallbackSink``    calls a function (sync or async) per item, or per batch
``StdoutSink``      prints one line per item
``ListSink``        appends to a Python list (tests, notebooks)
==================  ==========================================================================================
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from taskstream.brokers.base import Broker, OutgoingMessage
from taskstream.errors import ConfigurationError
from taskstream.messages import CONTENT_TYPE, WIRE_VERSION, dumps, new_id
from taskstream.producer import Producer
from taskstream.stream_ops.core import is_async_callable, is_keyed
from taskstream.stream_ops.runtime_context import RuntimeContext

__all__ = [
    "CallbackSink",
    "JsonLinesSink",
    "ListSink",
    "QueueSink",
    "SQLiteSink",
    "Sink",
    "SinkWriter",
    "StdoutSink",
]


class SinkWriter(abc.ABC):
    """One runtime's handle on a sink."""

    @abc.abstractmethod
    async def write(self, items: list[Any]) -> None:
        """Write items; return once they are safely written."""

    async def close(self) -> None:
        """Flush and release."""
        return None


class Sink(abc.ABC):
    """A sink description; :meth:`open` makes a writer per runtime."""

    label = "sink"

    @abc.abstractmethod
    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        """Make this runtime's writer."""


def _jsonable(item: Any) -> Any:
    if is_keyed(item):
        return {"key": item[0], "value": item[1]}
    return item


# -- lists, callbacks, stdout -------------------------------------------------------------------------


class _ListWriter(SinkWriter):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    async def write(self, items: list[Any]) -> None:
        self.items.extend(items)


class ListSink(Sink):
    """Appends every item to ``items`` (shared by all runtimes of this process)."""

    label = "list"

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        return _ListWriter(self.items)


class _CallbackWriter(SinkWriter):
    def __init__(self, fn: Callable[[Any], Any], per_batch: bool) -> None:
        self.fn = fn
        self.per_batch = per_batch
        self.is_async = is_async_callable(fn)

    async def write(self, items: list[Any]) -> None:
        if self.per_batch:
            result = self.fn(items)
            if inspect.isawaitable(result):
                await result
            return
        if self.is_async:
            for item in items:
                await self.fn(item)
            return
        for item in items:
            self.fn(item)


class CallbackSink(Sink):
    """Calls ``fn(item)`` (or ``fn(items)`` with ``per_batch=True``); ``fn`` may be async."""

    label = "callback"

    def __init__(self, fn: Callable[[Any], Any | Awaitable[Any]], *, per_batch: bool = False) -> None:
        if not callable(fn):
            raise ConfigurationError(f"CallbackSink needs a function, got {fn!r}")
        self.fn = fn
        self.per_batch = per_batch

    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        return _CallbackWriter(self.fn, self.per_batch)


class _StdoutWriter(SinkWriter):
    def __init__(self, stream: TextIO, prefix: str, fmt: Callable[[Any], str] | None) -> None:
        self.stream = stream
        self.prefix = prefix
        self.fmt = fmt

    async def write(self, items: list[Any]) -> None:
        fmt = self.fmt or (lambda item: orjson.dumps(_jsonable(item), default=str).decode())
        self.stream.write("".join(f"{self.prefix}{fmt(item)}\n" for item in items))
        self.stream.flush()


class StdoutSink(Sink):
    """Prints one line per item (JSON unless ``format`` is given)."""

    label = "stdout"

    def __init__(self, *, prefix: str = "", format: Callable[[Any], str] | None = None) -> None:
        self.prefix = prefix
        self.format = format

    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        return _StdoutWriter(sys.stdout, self.prefix, self.format)


# -- JSON Lines ---------------------------------------------------------------------------------------


class _JsonLinesWriter(SinkWriter):
    def __init__(self, path: Path, fsync: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.fsync = fsync

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self.fd)

    async def write(self, items: list[Any]) -> None:
        data = b"".join(dumps(_jsonable(item)) + b"\n" for item in items)
        if len(data) > 65536:
            await asyncio.to_thread(self._write, data)
        else:
            self._write(data)

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class JsonLinesSink(Sink):
    """Appends one JSON line per item (keyed items as ``{"key", "value"}``); ``fsync=True`` syncs each batch."""

    label = "jsonl"

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync

    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        return _JsonLinesWriter(self.path, self.fsync)


# -- SQLite -------------------------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _ident(what: str, name: str) -> str:
    if not _IDENT.match(name):
        raise ConfigurationError(f"SQLite {what} {name!r} is not a plain identifier (letters, digits, _)")
    return f'"{name}"'


def _enable_wal(conn: sqlite3.Connection, attempts: int = 100) -> None:
    # Switching a new database to WAL reads it, then needs it exclusively: two writers opening it at once
    # (replicas sharing the file) can get SQLITE_BUSY at once, without the busy timeout. Try again.
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.01 * (1 + attempt % 10))


class _SQLiteWriter(SinkWriter):
    def __init__(self, sink: SQLiteSink) -> None:
        self.sink = sink
        self.lock = threading.Lock()
        sink.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(sink.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            _enable_wal(self.conn)
            self.conn.execute("PRAGMA synchronous=NORMAL")
            cols = ", ".join(f"{_ident('column', c)}" for c in sink.columns)
            pk = (
                f", PRIMARY KEY ({', '.join(_ident('column', c) for c in sink.primary_key)})"
                if sink.primary_key
                else ""
            )
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {_ident('table', sink.table)} (_ts REAL, {cols}{pk})")
        except BaseException:
            self.conn.close()  # a writer that failed to open is not closed by anyone else
            raise
        verb = "INSERT OR REPLACE" if sink.primary_key else "INSERT"
        marks = ", ".join("?" for _ in range(len(sink.columns) + 1))
        col_list = ", ".join(_ident("column", c) for c in ("_ts", *sink.columns))
        self.sql = f"{verb} INTO {_ident('table', sink.table)} ({col_list}) VALUES ({marks})"

    def _row(self, item: Any, now: float) -> tuple[Any, ...]:
        sink = self.sink
        if sink.default_columns:
            key, value = (item[0], item[1]) if is_keyed(item) else (None, item)
            return (now, key, dumps(value).decode())
        record = item[1] if is_keyed(item) else item
        if not isinstance(record, dict):
            raise TypeError(f"SQLiteSink with columns needs dict items, got {type(record).__name__}")
        row: list[Any] = [now]
        for col in sink.columns:
            value = record.get(col)
            if isinstance(value, dict | list):
                value = dumps(value).decode()
            row.append(value)
        return tuple(row)

    def _write(self, items: list[Any]) -> None:
        now = time.time()
        rows = [self._row(item, now) for item in items]
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany(self.sql, rows)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    async def write(self, items: list[Any]) -> None:
        await asyncio.to_thread(self._write, items)

    async def close(self) -> None:
        with self.lock:
            self.conn.close()


class SQLiteSink(Sink):
    """Rows in a SQLite table.

    Args:
        path: database file.
        table: table name (created if missing, with a ``_ts`` insert-time column).
        columns: fields of dict items to store as columns; without them each row is ``key``, ``value`` (JSON).
        primary_key: columns that identify a row; rows are then upserted, so an item written twice (after a
            retry or a replica restart) is stored once.
    """

    label = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: str = "results",
        *,
        columns: Sequence[str] | None = None,
        primary_key: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        _ident("table", table)
        self.table = table
        self.default_columns = not columns
        self.columns = list(columns) if columns else ["key", "value"]
        for col in self.columns:
            _ident("column", col)
        self.primary_key = list(primary_key or [])
        for col in self.primary_key:
            if col not in self.columns:
                raise ConfigurationError(f"SQLiteSink primary_key column {col!r} is not one of columns {self.columns}")

    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        return await asyncio.to_thread(_SQLiteWriter, self)


# -- queues -------------------------------------------------------------------------------------------


class _QueueWriter(SinkWriter):
    def __init__(self, broker: Broker, queue: str, own: bool, producer: Producer) -> None:
        self.broker = broker
        self.queue = queue
        self.own = own
        self.producer = producer

    async def write(self, items: list[Any]) -> None:
        now = time.time()
        batch: list[OutgoingMessage] = []
        for item in items:
            key, body = (item[0], item[1]) if is_keyed(item) else (None, item)
            mid = new_id()
            doc: dict[str, Any] = {"ts": WIRE_VERSION, "id": mid, "kind": "record", "created_at": now, "body": body}
            if key is not None:
                doc["key"] = key
            batch.append(
                OutgoingMessage(
                    dumps(doc), {"content_type": CONTENT_TYPE, "ts_kind": "record"}, message_id=mid, key=key
                )
            )
        batch = await self.producer.offload_outgoing(batch)  # large items travel by reference
        step = max(1, self.broker.capabilities.max_batch)
        for i in range(0, len(batch), step):
            await self.broker.publish_batch(self.queue, batch[i : i + step])

    async def close(self) -> None:
        if self.own:
            await self.broker.close()


class QueueSink(Sink):
    """Publishes each item as a taskstream record envelope to ``queue`` (on the pipeline's broker by default).

    Items too large for the broker go to the runtime's payload store and travel as references (claim-check,
    :mod:`taskstream.payloads`); consumers, queue sources and stages resolve them.
    """

    label = "queue"

    def __init__(self, queue: str, *, broker: str | Broker | None = None) -> None:
        self.queue = queue
        self.broker = broker

    async def open(self, ctx: RuntimeContext) -> SinkWriter:
        broker, own = await ctx.queue_broker(self.broker, f"QueueSink({self.queue!r})")
        await broker.declare(self.queue, fifo=self.queue.endswith(".fifo"))
        return _QueueWriter(broker, self.queue, own, Producer(broker, claim_check=ctx.payloads()))
