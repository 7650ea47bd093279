"""Sources over Python iterables and async iterators."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch

__all__ = ["AsyncIterableSource", "IterableSource", "as_source"]


class IterableSource(Source):
    """Items of a (sync) iterable, in order. A list can be run again; a generator only once.

    The position is the number of items taken: a restarted stage skips that many (a generator is made anew
    by the restarted process, as the pipeline's module builds it).
    """

    label = "iterable"
    resumable = True

    def __init__(self, iterable: Iterable[Any], **bounds: Any) -> None:
        super().__init__(**bounds)
        self.iterable = iterable

    def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        return self.open_batches(ctx, batch_size)

    async def open_batches(
        self, ctx: RuntimeContext, batch_size: int, position: Any = None
    ) -> AsyncIterator[SourceBatch]:
        emitted = int(position) if position else 0
        it = itertools.islice(iter(self.iterable), emitted, None)
        while True:
            room = self.room(emitted, batch_size)
            if room == 0:
                return
            items = list(itertools.islice(it, room))
            if not items:
                return
            emitted += len(items)
            yield SourceBatch(items, position=emitted)


class AsyncIterableSource(Source):
    """Items of an async iterable. A reader task keeps at most ``batch_size`` items ahead (backpressure);
    items that are ready together travel in one batch, so a live feed is not held back."""

    label = "async-iterable"

    def __init__(self, iterable: AsyncIterable[Any], **bounds: Any) -> None:
        super().__init__(**bounds)
        self.iterable = iterable

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=batch_size)

        async def pump() -> None:
            try:
                async for item in self.iterable:
                    await queue.put((True, item))
            except Exception as exc:
                await queue.put((False, exc))
                return
            await queue.put((False, None))

        reader = asyncio.create_task(pump(), name="async-iterable-source")
        emitted = 0
        try:
            done = False
            while not done:
                room = self.room(emitted, batch_size)
                if room == 0:
                    return
                ok, item = await queue.get()
                items: list[Any] = []
                while True:
                    if not ok:
                        if item is not None:
                            raise item
                        done = True
                        break
                    items.append(item)
                    if len(items) >= room or queue.empty():
                        break
                    ok, item = queue.get_nowait()
                if items:
                    emitted += len(items)
                    yield SourceBatch(items)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def as_source(obj: Any) -> Source:
    """A Source as is; an async iterable or an iterable wrapped; anything else is refused."""
    from taskstream.errors import ConfigurationError

    if isinstance(obj, Source):
        return obj
    if isinstance(obj, AsyncIterable):
        return AsyncIterableSource(obj)
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes | dict):
        return IterableSource(obj)
    raise ConfigurationError(
        f"pipeline.source() needs a Source, an iterable or an async iterable, got {type(obj).__name__}"
    )
