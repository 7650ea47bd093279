"""Traffic under rapid connection cuts: a publisher that keeps sending numbered batches, and the cutting loop.

The shape of every cut test: start :class:`Publisher`, call :func:`cut_rapidly` (which fails as soon as a
``check`` does), stop the publisher (which raises what a publish raised), then wait until every number from
``range(publisher.sent)`` was handled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from taskstream.messages import Envelope
from taskstream.producer import Producer
from tests.support.proxy import TcpProxy

__all__ = ["Publisher", "cut_rapidly", "still_running"]


class Publisher:
    """Sends ``Envelope(body=i)`` for i = 0, 1, 2, ... to ``queue`` in batches of ``batch`` until stopped.

    Args:
        producer: the producer to send with.
        queue: the target queue.
        batch: messages per ``send_many``.
        pause: seconds between batches.
    """

    def __init__(self, producer: Producer, queue: str, batch: int = 50, pause: float = 0.01) -> None:
        self.producer = producer
        self.queue = queue
        self.batch = batch
        self.pause = pause
        self.sent = 0
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            first = self.sent
            await self.producer.send_many(self.queue, [Envelope(body=i) for i in range(first, first + self.batch)])
            self.sent = first + self.batch
            await asyncio.sleep(self.pause)

    def check(self) -> None:
        """Fail if publishing stopped by itself (a publish raised) or a publish failed."""
        if self.task.done() and (not self._stop.is_set() or self.task.exception() is not None):
            raise AssertionError(f"publishing stopped: {self.task.exception()!r}")

    async def stop(self) -> int:
        """Stop after the batch in flight; raises what a publish raised; returns how many were sent."""
        self._stop.set()
        await self.task
        return self.sent

    async def cancel(self) -> None:
        """Stop at once, ignoring errors (for ``finally`` blocks)."""
        self._stop.set()
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def cut_rapidly(proxy: TcpProxy, cuts: int, check: Callable[[], None] | None = None) -> None:
    """Cut every connection through ``proxy`` ``cuts`` times, 50 and 100 ms apart in turn; ``check()`` after
    each cut raises to fail the test at once (a publish failed, a consumer stopped)."""
    for cut in range(cuts):
        await asyncio.sleep(0.05 + 0.05 * (cut % 2))
        proxy.cut()
        if check is not None:
            try:
                check()
            except AssertionError as exc:
                raise AssertionError(f"after cut {cut + 1} of {cuts}: {exc}") from None


def still_running(task: asyncio.Task[object], what: str) -> Callable[[], None]:
    """A ``check`` for :func:`cut_rapidly`: fails once ``task`` ended (``what`` names it: "a declaration")."""

    def check() -> None:
        if task.done():
            raise AssertionError(f"{what} failed: {task.exception()!r}")

    return check
