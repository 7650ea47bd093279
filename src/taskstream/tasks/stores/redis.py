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
from taskstream.redis_url import check_redis_url
from taskstream.settings import redact_url
from taskstream.tasks.errors import ResultStoreError
from taskstream.tasks.stores.base import ResultStore, TaskInfo

__all__ = ["RedisResultStore"]

T = TypeVar("T")

_PREFIX = "taskstream:task:"
MAX_CONNECTIONS = 32

_PENDING_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'name', ARGV[1], 'queue', ARGV[2], 'submitted_at', ARGV[3],
             'reply_to', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""
# A record's non-empty reply_to must match the message's (a reused id never runs over another client's task).
_CLAIM_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
local r = redis.call('HGET', KEYS[1], 'reply_to')
local same = (not r) or r == '' or r == ARGV[6]
if ((not s) or s == 'pending' or s == 'running') and same then
  if not s then
    redis.call('HSET', KEYS[1], 'name', ARGV[3], 'queue', ARGV[4], 'submitted_at', ARGV[1])
  end
  if (not r) or r == '' then
    redis.call('HSET', KEYS[1], 'reply_to', ARGV[6])
  end
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"""
# ARGV: finished_at, worker, error (JSON), name, queue, submitted_at, reply_to, ttl ms, attempts
_REFUSE_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
local r = redis.call('HGET', KEYS[1], 'reply_to')
if s == 'success' or s == 'failed' or s == 'cancelled' then
  return 0
end
if r and r ~= '' and r ~= ARGV[7] then
  return 0
end
if not s then
  redis.call('HSET', KEYS[1], 'name', ARGV[4], 'queue', ARGV[5], 'attempts', ARGV[9])
  if ARGV[6] ~= '' then
    redis.call('HSET', KEYS[1], 'submitted_at', ARGV[6])
  end
end
local n = redis.call('HGET', KEYS[1], 'name')
if (not n) or n == '' then
  redis.call('HSET', KEYS[1], 'name', ARGV[4])
end
redis.call('HDEL', KEYS[1], 'result')
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'worker', ARGV[2], 'error', ARGV[3],
           'reply_to', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return 1
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
        reply_to=_text(get(b"reply_to", b"")),
    )


class RedisResultStore(ResultStore):
    """Task records in Redis (see the module docstring).

    Args:
        url: ``redis://host:port/db``.
        ttl: seconds a record is kept after its last write.
    """

    @classmethod
    def from_url(cls, url: str, *, ttl: float = 86400.0) -> RedisResultStore:
        """The store of ``url``; it keeps the options the installed redis-py reads and refuses others.

        Raises:
            ConfigurationError: an option redis-py does not read (with a "did you mean").
            ResultStoreError: a URL redis-py cannot use.
        """
        return cls(url, ttl=ttl)

    def __init__(self, url: str, *, ttl: float = 86400.0) -> None:
        check_redis_url(url, "Redis result store")
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
                "refuse": self._async.register_script(_REFUSE_LUA),
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
                        args=[r.name, r.queue, repr(r.submitted_at or time.time()), self._ttl_ms, r.reply_to],
                        client=pipe,
                    )
                await pipe.execute()

        await self._guard(run)

    async def claim(
        self, task_id: str, *, name: str, queue: str, worker: str, started_at: float, reply_to: str = ""
    ) -> TaskInfo | None:
        client = self._client()
        key = _PREFIX + task_id
        args = [repr(started_at), worker, name, queue, self._ttl_ms, reply_to]
        claimed = await self._guard(lambda: self._scripts["claim"](keys=[key], args=args))
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
            "reply_to": info.reply_to,
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

    async def record_refusal(self, info: TaskInfo) -> bool:
        self._client()
        args = [
            repr(info.finished_at or time.time()),
            info.worker,
            dumps(info.error),
            info.name,
            info.queue,
            repr(info.submitted_at) if info.submitted_at is not None else "",
            info.reply_to,
            self._ttl_ms,
            info.attempts,
        ]
        written = await self._guard(lambda: self._scripts["refuse"](keys=[_PREFIX + info.task_id], args=args))
        return bool(int(written))

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
