"""The Redis result store: task records shared by every host that reaches one Redis server.

One hash per task, ``taskstream:task:<id>``, with ``PEXPIRE`` set to the store's ttl on every write. Claim,
cancel and add-pending are Lua scripts, so each is atomic on the server: a task is either cancelled before it
is claimed or claimed before it is cancelled. Results and errors are stored as JSON (the message codec).

URL: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS); passwords never appear in reprs or errors.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from taskstream.messages import dumps, loads
from taskstream.settings import redact_url
from taskstream.tasks.errors import ResultStoreError
from taskstream.tasks.stores.base import ResultStore, TaskInfo

__all__ = ["RedisResultStore"]

T = TypeVar("T")

_PREFIX = "taskstream:task:"
MAX_CONNECTIONS = 32

_PENDING_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'name', ARGV[1], 'queue', ARGV[2], 'submitted_at', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""
_CLAIM_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
if (not s) or s == 'pending' or s == 'running' then
  if not s then
    redis.call('HSET', KEYS[1], 'name', ARGV[3], 'queue', ARGV[4], 'submitted_at', ARGV[1])
  end
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"""
_CANCEL_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
if (not s) or s == 'pending' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    return float(_text(value)) if value not in (None, b"", "") else None


def _hash_to_info(task_id: str, data: dict[Any, Any]) -> TaskInfo | None:
    if not data:
        return None
    get = data.get
    status = _text(get(b"status", b"pending"))
    return TaskInfo(
        task_id=task_id,
        name=_text(get(b"name", b"")),
        queue=_text(get(b"queue", b"")),
        status=status,  # type: ignore[arg-type]
        submitted_at=_float(get(b"submitted_at")),
        started_at=_float(get(b"started_at")),
        finished_at=_float(get(b"finished_at")),
        attempts=int(_text(get(b"attempts", b"0"))),
        worker=_text(get(b"worker", b"")),
        result=loads(get(b"result", b"null")) if status == "success" else None,
        error=loads(get(b"error", b"null")),
    )


class RedisResultStore(ResultStore):
    """Task records in Redis (see the module docstring).

    Args:
        url: ``redis://host:port/db``.
        ttl: seconds a record is kept after its last write.
    """

    def __init__(self, url: str, *, ttl: float = 86400.0) -> None:
        self.url = url
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))
        try:
            self._sync = redis.Redis.from_url(url)
        except ValueError as exc:
            raise ResultStoreError(f"bad Redis URL {redact_url(url)!r}: {exc}") from None
        self._sync_cancel = self._sync.register_script(_CANCEL_LUA)
        self._async: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    def _client(self) -> aioredis.Redis:
        if self._async is None:
            # A blocking pool: many concurrent writes wait for a connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(self.url, max_connections=MAX_CONNECTIONS, timeout=30)
            self._async = aioredis.Redis(connection_pool=pool)
            self._scripts = {
                "pending": self._async.register_script(_PENDING_LUA),
                "claim": self._async.register_script(_CLAIM_LUA),
            }
        return self._async

    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except redis.RedisError as exc:
            raise ResultStoreError(f"Redis result store {redact_url(self.url)}: {type(exc).__name__}") from exc

    async def add_pending(self, records: Sequence[TaskInfo]) -> None:
        if not records:
            return
        client = self._client()
        script = self._scripts["pending"]

        async def run() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for r in records:
                    await script(
                        keys=[_PREFIX + r.task_id],
                        args=[r.name, r.queue, repr(r.submitted_at or time.time()), self._ttl_ms],
                        client=pipe,
                    )
                await pipe.execute()

        await self._guard(run)

    async def claim(self, task_id: str, *, name: str, queue: str, worker: str, started_at: float) -> TaskInfo | None:
        client = self._client()
        key = _PREFIX + task_id
        claimed = await self._guard(
            lambda: self._scripts["claim"](keys=[key], args=[repr(started_at), worker, name, queue, self._ttl_ms])
        )
        if int(claimed):
            return None
        data = await self._guard(lambda: client.hgetall(key))
        return _hash_to_info(task_id, data)

    async def finish(self, info: TaskInfo) -> None:
        client = self._client()
        key = _PREFIX + info.task_id
        mapping: dict[Any, Any] = {
            "status": info.status,
            "name": info.name,
            "queue": info.queue,
            "attempts": info.attempts,
            "worker": info.worker,
        }
        for name in ("submitted_at", "started_at", "finished_at"):
            value = getattr(info, name)
            if value is not None:
                mapping[name] = repr(value)
        if info.status == "success":
            mapping["result"] = dumps(info.result)
        if info.error is not None:
            mapping["error"] = dumps(info.error)

        async def run() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()

        await self._guard(run)

    def get(self, task_id: str) -> TaskInfo | None:
        try:
            data = self._sync.hgetall(_PREFIX + task_id)
        except redis.RedisError as exc:
            raise ResultStoreError(f"Redis result store {redact_url(self.url)}: {type(exc).__name__}") from exc
        return _hash_to_info(task_id, data)

    def try_cancel(self, task_id: str) -> bool:
        try:
            done = self._sync_cancel(keys=[_PREFIX + task_id], args=[repr(time.time()), self._ttl_ms])
        except redis.RedisError as exc:
            raise ResultStoreError(f"Redis result store {redact_url(self.url)}: {type(exc).__name__}") from exc
        return bool(int(done))

    async def close(self) -> None:
        if self._async is not None:
            await self._async.aclose(close_connection_pool=True)
            self._async = None
        self._sync.close()
