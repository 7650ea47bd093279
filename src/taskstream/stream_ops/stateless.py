"""Stateless operators, each a few lines over the ``flat_map_batch`` primitive.

User functions may be plain or ``async def``. Plain functions run inline on the event loop (keep them quick,
or make them ``async`` and offload); async ones run concurrently within a batch and keep the batch's order.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from taskstream.stream_ops.core import BatchOp, is_async_callable

__all__ = [
    "filter_op",
    "flat_map_op",
    "inspect_op",
    "key_by_op",
    "map_op",
    "map_value_op",
]


async def _gather(awaitables: Iterable[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*awaitables))


def map_op(fn: Callable[[Any], Any]) -> BatchOp:
    """``[fn(x) for x in batch]``."""
    if is_async_callable(fn):

        async def amap(items: list[Any]) -> list[Any]:
            return await _gather(fn(x) for x in items)

        async def amap_one(x: Any) -> list[Any]:
            return [await fn(x)]

        return BatchOp(amap, amap_one, is_async=True, one_to_one=True)

    def smap(items: list[Any]) -> list[Any]:
        return list(map(fn, items))  # the loop in C: one call of fn per item, no comprehension frame

    return BatchOp(smap, lambda x: [fn(x)], one_to_one=True)


def map_value_op(fn: Callable[[Any], Any]) -> BatchOp:
    """Maps the value of keyed ``(key, value)`` items, keeping the key."""
    if is_async_callable(fn):

        async def amap(items: list[Any]) -> list[Any]:
            values = await _gather(fn(v) for _, v in items)
            return [(kv[0], v) for kv, v in zip(items, values, strict=True)]

        async def amap_one(kv: Any) -> list[Any]:
            return [(kv[0], await fn(kv[1]))]

        return BatchOp(amap, amap_one, is_async=True, one_to_one=True)
    return BatchOp(lambda items: [(k, fn(v)) for k, v in items], lambda kv: [(kv[0], fn(kv[1]))], one_to_one=True)


def filter_op(predicate: Callable[[Any], Any]) -> BatchOp:
    """Keeps the items for which ``predicate`` is true."""
    if is_async_callable(predicate):

        async def afilter(items: list[Any]) -> list[Any]:
            keep = await _gather(predicate(x) for x in items)
            return [x for x, k in zip(items, keep, strict=True) if k]

        async def afilter_one(x: Any) -> list[Any]:
            return [x] if await predicate(x) else []

        return BatchOp(afilter, afilter_one, is_async=True, subset=True)
    return BatchOp(lambda items: list(filter(predicate, items)), lambda x: [x] if predicate(x) else [], subset=True)


def flat_map_op(fn: Callable[[Any], Any]) -> BatchOp:
    """Each item becomes zero or more items (``fn`` returns an iterable)."""
    if is_async_callable(fn):

        async def aflat(items: list[Any]) -> list[Any]:
            parts = await _gather(fn(x) for x in items)
            return [y for part in parts for y in part]

        async def aflat_one(x: Any) -> list[Any]:
            return list(await fn(x))

        return BatchOp(aflat, aflat_one, is_async=True)
    return BatchOp(lambda items: [y for x in items for y in fn(x)], lambda x: list(fn(x)))


def key_by_op(fn: Callable[[Any], Any]) -> BatchOp:
    """``x -> (str(fn(x)), x)``: keys are strings (they travel in message keys and pick replicas)."""

    def keyed(items: list[Any]) -> list[Any]:
        keys = list(map(fn, items))
        if keys and not (len(set(map(type, keys))) == 1 and type(keys[0]) is str):  # type checks and pairs in C
            keys = [k if type(k) is str else str(k) for k in keys]
        return list(zip(keys, items, strict=True))

    def keyed_one(x: Any) -> list[Any]:
        k = fn(x)
        return [(k if type(k) is str else str(k), x)]

    return BatchOp(keyed, keyed_one, one_to_one=True)


def inspect_op(fn: Callable[[Any], Any]) -> BatchOp:
    """Calls ``fn(item)`` for its side effect (a live view, a log line) and passes items on unchanged."""
    if is_async_callable(fn):

        async def ainspect(items: list[Any]) -> list[Any]:
            for x in items:
                await fn(x)
            return items

        return BatchOp(ainspect, None, is_async=True, subset=True)

    def sinspect(items: list[Any]) -> list[Any]:
        for x in items:
            result = fn(x)
            if inspect.isawaitable(result):  # pragma: no cover - a sync callable returning a coroutine
                raise TypeError("inspect() got a plain function that returned an awaitable; use 'async def'")
        return items

    return BatchOp(sinspect, None, subset=True)
