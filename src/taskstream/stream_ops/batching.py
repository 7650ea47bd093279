"""``batch`` (by size or time) and ``rate_limit``.

``batch(size, timeout)`` groups the values of each key into lists of at most ``size``; a list leaves early
when its first value has waited ``timeout`` seconds (processing time, injectable), and at end-of-stream.
Unkeyed items (all items of a stream known to be unkeyed; the items that are not ``(str, value)`` tuples
where the keying is unknown) travel under the reserved key :data:`UNKEYED` and share one batch (and one
replica); they leave as plain lists.

``rate_limit(per_second, burst)`` passes at most ``per_second`` items per second on average, ``burst`` at a
time, by waiting: the wait holds up the source (backpressure), nothing is dropped. The limit is per runtime
(per replica when the stage is spread). It keeps the run's time (``run(now=...)``) unless given its own, and
waits with that clock's ``sleep`` when it has one (:class:`~taskstream.stream_ops.windows.clock.ManualTime` does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.core import BatchOp, is_async_callable, is_keyed
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.stateful import Emit, KeyedLogic

__all__ = ["UNKEYED", "BatchLogic", "batch_builder", "key_all", "key_unkeyed", "rate_limit_op", "unkey"]

#: the key unkeyed items are batched under (a control character keeps it apart from keys made by ``key_by``)
UNKEYED = "\x1funkeyed"


def _key_all(items: list[Any]) -> list[Any]:
    return [(UNKEYED, x) for x in items]


def _key_unkeyed(items: list[Any]) -> list[Any]:
    return [x if is_keyed(x) else (UNKEYED, x) for x in items]


def _unkey(items: list[Any]) -> list[Any]:
    return [kv[1] if kv[0] == UNKEYED else kv for kv in items]


key_all = BatchOp(_key_all, None, one_to_one=True)
"""Before a batch on an unkeyed stream: every item under :data:`UNKEYED`."""
key_unkeyed = BatchOp(_key_unkeyed, None, one_to_one=True)
"""Before a batch where the keying is unknown: items that are not keyed go under :data:`UNKEYED`."""
unkey = BatchOp(_unkey, None, one_to_one=True)
"""After such a batch: ``(UNKEYED, [values])`` becomes ``[values]``; batches of real keys stay keyed."""


class BatchLogic(KeyedLogic):
    """Pending values of one key and when the first of them arrived."""

    __slots__ = ("first", "now", "pending", "size", "timeout")

    def __init__(self, size: int, timeout: float | None, now: Callable[[], float], state: Any = None) -> None:
        self.size = size
        self.timeout = timeout
        self.now = now
        self.pending: list[Any] = []
        self.first: float | None = None
        if state:
            self.pending = list(state["pending"])
            self.first = state["first"]

    def on_batch(self, values: list[Any]) -> Emit:
        out: Emit = []
        if not self.pending:
            self.first = self.now()
        for value in values:
            self.pending.append(value)
            if len(self.pending) >= self.size:
                out.append(("down", self.pending))
                self.pending = []
                self.first = self.now()
        if (
            self.timeout is not None
            and self.pending
            and self.first is not None
            and self.now() - self.first >= self.timeout
        ):
            out.append(("down", self.pending))
            self.pending = []
        return out

    def on_notify(self, now: float) -> Emit:
        if self.pending and self.first is not None and self.timeout is not None and now - self.first >= self.timeout:
            out: Emit = [("down", self.pending)]
            self.pending = []
            return out
        return []

    def notify_at(self) -> float | None:
        if self.pending and self.timeout is not None and self.first is not None:
            return self.first + self.timeout
        return None

    def on_eof(self) -> Emit:
        if self.pending:
            out: Emit = [("down", self.pending)]
            self.pending = []
            return out
        return []

    def is_empty(self) -> bool:
        return not self.pending

    def snapshot(self) -> Any:
        return {"pending": self.pending, "first": self.first}


def batch_builder(
    size: int, timeout: float | None, now: Callable[[], float] | None
) -> Callable[[RuntimeContext], Callable[[str, Any], KeyedLogic]]:
    if size < 1:
        raise ConfigurationError(f"batch size must be at least 1, got {size}")
    if timeout is not None and timeout <= 0:
        raise ConfigurationError(f"batch timeout must be positive, got {timeout}")

    def build(ctx: RuntimeContext) -> Callable[[str, Any], KeyedLogic]:
        clock = now or ctx.now
        return lambda key, state: BatchLogic(size, timeout, clock, state)

    return build


def _sleep_of(clock: Callable[[], float]) -> Callable[[float], Awaitable[None]]:
    """How to wait in ``clock``'s time: its own ``async sleep`` (a ``ManualTime``), else ``asyncio.sleep``."""
    own = getattr(clock, "sleep", None)
    if callable(own) and is_async_callable(own):
        return own  # type: ignore[no-any-return]
    return asyncio.sleep


def rate_limit_op(
    per_second: float,
    burst: int | None,
    now: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> Callable[[RuntimeContext], BatchOp]:
    """A token bucket in front of the rest of the stage; see the module docstring."""
    if not per_second > 0:
        raise ConfigurationError(f"rate_limit needs a positive rate, got {per_second}")
    chunk = burst if burst is not None else max(1, int(per_second / 10))
    if chunk < 1:
        raise ConfigurationError(f"rate_limit burst must be at least 1, got {burst}")
    interval = 1.0 / per_second

    def build(ctx: RuntimeContext) -> BatchOp:
        clock = now or ctx.now
        wait = sleep or _sleep_of(clock)
        tat = [clock()]  # theoretical arrival time of the next item (GCRA)

        async def limit(items: list[Any]) -> list[Any]:
            t = clock()
            if tat[0] - t > 2 * chunk * interval:  # the clock went back (a wall clock set back): start afresh
                tat[0] = t
            new_tat = max(tat[0], t) + len(items) * interval
            allowed_at = new_tat - chunk * interval  # a full bucket lets one burst through at once
            tat[0] = new_tat
            if allowed_at > t:
                await wait(allowed_at - t)
            return items

        return BatchOp(limit, None, is_async=True, chunk=chunk, subset=True)

    return build
