"""State stores: where stage replicas keep their snapshots (SQLite by default, Redis as an option).

A store holds, per namespace (``<pipeline>/<stage>/<replica>``), a map from string keys to JSON values.
``commit`` applies a batch of puts and deletes atomically, so a snapshot is never half written.

=====================================  ===================================================================
URL                                    Store
=====================================  ===================================================================
``sqlite:///path/to/state.db``         one SQLite file (WAL mode); replicas on one machine share it
``redis://127.0.0.1:6379/0``           a Redis hash per namespace, updated in MULTI/EXEC transactions
``memory://``                          a dict in this process (tests; lost on exit)
=====================================  ===================================================================
"""

from __future__ import annotations

import abc
import asyncio
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.messages import dumps, loads
from taskstream.redis_url import check_redis_url
from taskstream.schemes import Backend, load_backend
from taskstream.settings import redact_url
from taskstream.urloptions import URLOptions

__all__ = [
    "DEFAULT_STATE_URL",
    "MemoryStateStore",
    "RedisStateStore",
    "SQLiteStateStore",
    "StateStore",
    "state_store_from_url",
]

DEFAULT_STATE_URL = "sqlite:///.taskstream/state.db"


class StateStore(abc.ABC):
    """Snapshots of stage replicas: ``load`` a namespace, ``commit`` changes atomically, ``clear`` it."""

    @abc.abstractmethod
    async def load(self, namespace: str) -> dict[str, Any]:
        """Everything stored under ``namespace``."""

    @abc.abstractmethod
    async def commit(self, namespace: str, updates: Mapping[str, Any]) -> None:
        """Apply puts (``key: value``) and deletes (``key: None``) in one transaction."""

    @abc.abstractmethod
    async def clear(self, namespace: str) -> None:
        """Delete the namespace."""

    async def close(self) -> None:
        """Release connections."""
        return None

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        """Build the store from its URL (:func:`state_store_from_url` picks the class by scheme).

        A store of your own need not have one: pass it to the pipeline as an instance.

        Raises:
            ConfigurationError: an unknown option or a URL this store cannot use.
        """
        raise ConfigurationError(f"{cls.__name__} is not built from a URL: pass an instance")


class MemoryStateStore(StateStore):
    """A dict; shared by the replicas of one process."""

    #: it reads no URL options: any given is refused by name
    OPTIONS: ClassVar[URLOptions] = URLOptions("memory state store", [])

    @classmethod
    def from_url(cls, url: str) -> MemoryStateStore:
        """A fresh store for ``memory://``.

        Raises:
            ConfigurationError: the URL has a query option (this store reads none).
        """
        cls.OPTIONS.parse(url.partition("?")[2], url=url)
        return cls()

    def __init__(self) -> None:
        self.data: dict[str, dict[str, bytes]] = {}

    async def load(self, namespace: str) -> dict[str, Any]:
        return {k: loads(v) for k, v in self.data.get(namespace, {}).items()}

    async def commit(self, namespace: str, updates: Mapping[str, Any]) -> None:
        space = self.data.setdefault(namespace, {})
        for key, value in updates.items():
            if value is None:
                space.pop(key, None)
            else:
                space[key] = dumps(value)

    async def clear(self, namespace: str) -> None:
        self.data.pop(namespace, None)


class SQLiteStateStore(StateStore):
    """One SQLite file in WAL mode; calls run on a worker thread so the loop never blocks on disk."""

    #: it reads no URL options: any given is refused by name
    OPTIONS: ClassVar[URLOptions] = URLOptions("SQLite state store", [])

    @classmethod
    def from_url(cls, url: str) -> SQLiteStateStore:
        """The store of ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` (the file is opened on first use).

        Raises:
            ConfigurationError: the URL names no file, or has a query option (this store reads none).
        """
        path, _, query = url.split("://", 1)[-1].partition("?")
        cls.OPTIONS.parse(query, url=url)
        if path.startswith("/"):
            path = path[1:]  # sqlite:///relative, sqlite:////absolute
        if not path:
            raise ConfigurationError(f"sqlite state URL {url!r} has no file path")
        return cls(path)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS taskstream_state ("
                    " ns TEXT NOT NULL, k TEXT NOT NULL, v BLOB NOT NULL, PRIMARY KEY (ns, k))"
                )
            except BaseException:
                conn.close()  # not kept, so nobody else would close it
                raise
            self._conn = conn
        return self._conn

    def _load(self, namespace: str) -> dict[str, Any]:
        with self._lock:
            rows = self._connect().execute("SELECT k, v FROM taskstream_state WHERE ns = ?", (namespace,)).fetchall()
        return {k: loads(v) for k, v in rows}

    def _commit(self, namespace: str, updates: Mapping[str, Any]) -> None:
        puts = [(namespace, k, dumps(v)) for k, v in updates.items() if v is not None]
        deletes = [(namespace, k) for k, v in updates.items() if v is None]
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if puts:
                    conn.executemany("INSERT OR REPLACE INTO taskstream_state (ns, k, v) VALUES (?, ?, ?)", puts)
                if deletes:
                    conn.executemany("DELETE FROM taskstream_state WHERE ns = ? AND k = ?", deletes)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _clear(self, namespace: str) -> None:
        with self._lock:
            self._connect().execute("DELETE FROM taskstream_state WHERE ns = ?", (namespace,))

    async def load(self, namespace: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._load, namespace)

    async def commit(self, namespace: str, updates: Mapping[str, Any]) -> None:
        if updates:
            await asyncio.to_thread(self._commit, namespace, updates)

    async def clear(self, namespace: str) -> None:
        await asyncio.to_thread(self._clear, namespace)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RedisStateStore(StateStore):
    """A Redis hash per namespace (key ``taskstream:state:<namespace>``), changed in MULTI/EXEC."""

    @classmethod
    def from_url(cls, url: str) -> RedisStateStore:
        """The store of ``redis://[:password@]host:port/db`` (``rediss://`` for TLS).

        Raises:
            ConfigurationError: an option the installed redis-py does not read (with a "did you mean").
            MissingExtraError: the ``redis`` package is not installed.
        """
        return cls(url)

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - the extra is installed in dev
            raise MissingExtraError("Redis state store", "redis", "redis") from exc
        check_redis_url(url, "Redis state store")
        self.url = url
        self._client = aioredis.Redis.from_url(url)

    def _key(self, namespace: str) -> str:
        return f"taskstream:state:{namespace}"

    async def load(self, namespace: str) -> dict[str, Any]:
        raw = await self._client.hgetall(self._key(namespace))
        return {(k.decode() if isinstance(k, bytes) else k): loads(v) for k, v in raw.items()}

    async def commit(self, namespace: str, updates: Mapping[str, Any]) -> None:
        if not updates:
            return
        key = self._key(namespace)
        puts = {k: dumps(v) for k, v in updates.items() if v is not None}
        deletes = [k for k, v in updates.items() if v is None]
        async with self._client.pipeline(transaction=True) as pipe:
            if puts:
                pipe.hset(key, mapping=puts)  # type: ignore[arg-type]
            if deletes:
                pipe.hdel(key, *deletes)
            await pipe.execute()

    async def clear(self, namespace: str) -> None:
        await self._client.delete(self._key(namespace))

    async def close(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"<RedisStateStore {redact_url(self.url)}>"


_REDIS = Backend("taskstream.stream_ops.state:RedisStateStore", "Redis state store", "redis", "redis", "redis")
#: URL scheme -> the store class (imported on first use) and the extra its client library comes with. The
#: classes live in this module for now; a backend moved to a module of its own only changes its row.
_STORES: dict[str, Backend] = {
    "sqlite": Backend("taskstream.stream_ops.state:SQLiteStateStore", "SQLite state store"),
    "redis": _REDIS,
    "rediss": _REDIS,
    "memory": Backend("taskstream.stream_ops.state:MemoryStateStore", "memory state store"),
}


def state_store_from_url(url: str | None = None) -> StateStore:
    """Build the store for ``url`` (default: ``TASKSTREAM_STATE_URL`` or ``sqlite:///.taskstream/state.db``).

    The scheme picks the class (see the module table), its ``from_url`` reads the rest.

    Example:
        >>> type(state_store_from_url("memory://")).__name__
        'MemoryStateStore'

    Raises:
        ConfigurationError: unknown scheme (with a "did you mean") or option, or an unusable URL; the message
            shows the URL without secrets.
        MissingExtraError: ``redis://`` without the ``redis`` package; the message names the ``pip install``.
    """
    url = url or os.environ.get("TASKSTREAM_STATE_URL") or DEFAULT_STATE_URL
    cls: type[StateStore] = load_backend(_STORES, url, what="state store", base=StateStore)
    return cls.from_url(url)
