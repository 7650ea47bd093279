"""``TaskFuture``, ``gather`` and ``as_completed``: futures that work from sync code, async code and notebooks.

A :class:`TaskFuture` *is* a :class:`concurrent.futures.Future` (thread-safe; ``result(timeout)``,
``exception()``, ``done()``, ``cancel()``, ``add_done_callback()``) that can also be awaited from any event
loop. Its result arrives on the App's event loop (a background thread for sync callers), so:

* in a plain script, ``fut.result()`` blocks the script while the App's loop works;
* in a coroutine, ``await fut`` suspends only that coroutine;
* in Jupyter (a running loop), both work: ``fut.result()`` blocks the cell, ``await fut`` does not.

Awaiting never cancels the task: a coroutine that stops waiting (a timeout, a cancelled task) leaves the
task running; call :meth:`TaskFuture.cancel` for that. Done-callbacks run on the thread that completed the
future (the App's loop thread), as with ``concurrent.futures``; keep them short.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from taskstream.tasks.stores.base import TaskInfo

__all__ = ["AsCompleted", "GatheredFuture", "TaskFuture", "as_completed", "gather"]

T = TypeVar("T")

PROGRESS_MIN_FUTURES = 10


class FutureOwner:
    """What a TaskFuture asks of the runtime that made it (implemented by the task client)."""

    def cancel_future(self, future: TaskFuture[Any]) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def in_loop_thread(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def local_info(self, future: TaskFuture[Any]) -> TaskInfo | None:  # pragma: no cover - interface
        raise NotImplementedError


class AwaitableFuture(concurrent.futures.Future[T]):
    """A concurrent future that any event loop can await (without cancelling it)."""

    def _blocks_its_loop(self) -> bool:
        return False

    def _check_blocking(self, what: str) -> None:
        if not self.done() and self._blocks_its_loop():
            raise RuntimeError(
                f"{type(self).__name__}.{what}() would block the event loop that delivers the answer; "
                "use 'await future' in async code"
            )

    def result(self, timeout: float | None = None) -> T:
        """The result, waiting up to ``timeout`` seconds (``TimeoutError`` after that)."""
        self._check_blocking("result")
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception (``None`` on success), waiting up to ``timeout`` seconds."""
        self._check_blocking("exception")
        return super().exception(timeout)

    def __await__(self) -> Generator[Any, None, T]:
        if not self.done():
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(_: concurrent.futures.Future[T]) -> None:
                if asyncio._get_running_loop() is loop:  # completed on the awaiting loop's own thread
                    _set_none(waiter)
                    return
                with contextlib.suppress(RuntimeError):  # the awaiting loop is closed
                    loop.call_soon_threadsafe(_set_none, waiter)

            self.add_done_callback(wake)
            yield from waiter.__await__()
        return super().result(0)


def _set_none(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class TaskFuture(AwaitableFuture[T], Generic[T]):
    """The future result of one submitted task (or of one item of a ``map`` chunk).

    Attributes:
        task_id: the id to ask any client about (``app.get_task(task_id)``). Items of one ``map`` chunk
            share their chunk's id and differ by ``index``.
        name: the task's registered name.
        index: position in its chunk for ``map(..., chunksize>1)``; ``None`` otherwise.
    """

    def __init__(self, owner: FutureOwner, task_id: str, name: str, index: int | None = None) -> None:
        super().__init__()
        self._owner = owner
        self.task_id = task_id
        self.name = name
        self.index = index

    def _blocks_its_loop(self) -> bool:
        return self._owner.in_loop_thread()

    def cancel(self) -> bool:
        """Cancel the task if no worker has started it; ``False`` if it runs or finished.

        A cancelled task that is still on its queue is dropped by the worker that receives it. Items of a
        ``map`` chunk cancel together.
        """
        if self.done():
            return self.cancelled()
        return self._owner.cancel_future(self)

    def _force_cancel(self) -> bool:
        return super().cancel()

    def _settle(self, value: Any = None, error: BaseException | None = None) -> None:
        """Complete from the runtime; ignored if already done (a cancel won the race)."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)

    @property
    def status(self) -> str:
        """``pending``/``running``/``success``/``failed``/``cancelled`` as this client knows it."""
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "failed" if super().exception(0) is not None else "success"
        info = self._owner.local_info(self)
        return info.status if info is not None else "pending"

    def info(self) -> TaskInfo | None:
        """The task's record (status and timestamps) as far as this client knows."""
        return self._owner.local_info(self)

    def __repr__(self) -> str:
        index = f"[{self.index}]" if self.index is not None else ""
        return f"<TaskFuture {self.name} {self.task_id}{index} {self.status}>"


class GatheredFuture(AwaitableFuture[list[Any]]):
    """The results of many futures, in order. Awaitable, or ``.result()`` from sync code.

    With ``return_exceptions=False`` the first failure fails the whole (like :func:`asyncio.gather`).
    A sync caller in a terminal waiting on :data:`PROGRESS_MIN_FUTURES` or more futures sees a progress bar
    (``progress=False`` turns it off, ``True`` forces it).
    """

    def __init__(
        self,
        futures: list[concurrent.futures.Future[Any]],
        *,
        return_exceptions: bool = False,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        self.futures = futures
        self._return_exceptions = return_exceptions
        self._progress = progress
        self._left = len(futures)
        self._lock = threading.Lock()
        if not futures:
            self.set_result([])
            return
        for future in futures:
            future.add_done_callback(self._one_done)

    def _blocks_its_loop(self) -> bool:
        return any(isinstance(f, AwaitableFuture) and f._blocks_its_loop() for f in self.futures if not f.done())

    def _one_done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._left -= 1
            left = self._left
        if self.done():
            return
        if not self._return_exceptions:
            error = _error_of(future)
            if error is not None:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    self.set_exception(error)
                return
        if left == 0:
            values = [self._value(f) for f in self.futures]
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self.set_result(values)

    def _value(self, future: concurrent.futures.Future[Any]) -> Any:
        if self._return_exceptions:
            error = _error_of(future)
            if error is not None:
                return error
        return future.result()

    def result(self, timeout: float | None = None) -> list[Any]:
        """All results in order (waiting up to ``timeout`` seconds), with a progress bar where it helps."""
        self._check_blocking("result")
        if not self.done() and _want_progress(self._progress, len(self.futures)):
            _wait_with_progress(self, self.futures, timeout)
        return super().result(timeout)


def _error_of(future: concurrent.futures.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return concurrent.futures.CancelledError(f"{future!r} was cancelled")
    return future.exception(0)


def _want_progress(progress: bool | None, count: int) -> bool:
    if progress is not None:
        return progress
    return count >= PROGRESS_MIN_FUTURES and sys.stderr.isatty()


def _wait_with_progress(
    whole: concurrent.futures.Future[Any], futures: list[concurrent.futures.Future[Any]], timeout: float | None
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        job = bar.add_task("tasks", total=len(futures))
        pending = set(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and not whole.done():
            _, pending = concurrent.futures.wait(pending, timeout=0.1, return_when=concurrent.futures.FIRST_COMPLETED)
            bar.update(job, completed=len(futures) - len(pending))
            if deadline is not None and time.monotonic() > deadline:
                return


def gather(
    *futures: concurrent.futures.Future[Any] | Iterable[concurrent.futures.Future[Any]],
    return_exceptions: bool = False,
    progress: bool | None = None,
) -> GatheredFuture:
    """Combine futures into one: ``await gather(*futs)`` or ``gather(*futs).result()``.

    Accepts futures or iterables of futures (``gather(f.map(xs))`` works).

    Example:
        >>> # results = taskstream.gather(*(pi.submit(10**6) for _ in range(8))).result()
    """
    flat: list[concurrent.futures.Future[Any]] = []
    for item in futures:
        if isinstance(item, concurrent.futures.Future):
            flat.append(item)
        else:
            flat.extend(item)
    return GatheredFuture(flat, return_exceptions=return_exceptions, progress=progress)


class AsCompleted(Generic[T]):
    """Futures in the order they finish: ``for f in as_completed(fs)`` or ``async for f in as_completed(fs)``."""

    def __init__(self, futures: Iterable[concurrent.futures.Future[T]], timeout: float | None = None) -> None:
        self.futures = list(futures)
        self.timeout = timeout

    def __iter__(self) -> Iterator[concurrent.futures.Future[T]]:
        return concurrent.futures.as_completed(self.futures, timeout=self.timeout)

    def __aiter__(self) -> AsyncIterator[concurrent.futures.Future[T]]:
        return self._async_iter()

    async def _async_iter(self) -> AsyncIterator[concurrent.futures.Future[T]]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[concurrent.futures.Future[T]] = asyncio.Queue()

        def push(future: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.put_nowait, future)

        for future in self.futures:
            future.add_done_callback(push)
        async with asyncio.timeout(self.timeout):
            for _ in range(len(self.futures)):
                yield await ready.get()


def as_completed(futures: Iterable[concurrent.futures.Future[T]], timeout: float | None = None) -> AsCompleted[T]:
    """Yield futures as they finish, from sync (``for``) or async (``async for``) code."""
    return AsCompleted(futures, timeout)
