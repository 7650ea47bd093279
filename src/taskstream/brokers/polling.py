"""The subscription machinery shared by the brokers that poll (SQS, Azure Storage Queues).

A polling broker hands out nothing by itself: pollers call its receive API and put what comes back in a
buffer that ``__anext__`` drains. What every such broker needs is written here once (kombu's virtual
transport ``QoS`` is the model):

* **prefetch accounting**: received-and-unsettled messages (buffered or handed out) never exceed
  ``prefetch``; a receive asks only for the free slots, and a message whose visibility lapsed frees its slot
  (it is back on the queue, as on the memory broker);
* **keep-alive**: messages waiting in the buffer are kept invisible, so waiting costs them no attempt; one
  whose visibility lapsed anyway is dropped, not handed out (someone else may hold it now);
* **back-off**: failing receives are retried with a doubling pause, with ONE warning per outage and one
  line when receives work again; errors that retrying cannot fix fail the subscription;
* **give-back on close**: whatever is held goes back to the queue at once, and a receive that ends after
  the close gives its messages straight back.

A backend implements :meth:`PollingSubscription._receive`, :meth:`PollingSubscription._set_visibility` and,
where it has its own error types, :meth:`PollingSubscription._classify`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar

from taskstream.brokers.base import Delivery, Subscription
from taskstream.errors import ConfigurationError

__all__ = ["Backoff", "PolledDelivery", "PollingSubscription"]


class PolledDelivery(Delivery):
    """A delivery of a polling broker, with the time its visibility lapses.

    Attributes:
        deadline: ``time.monotonic()`` at which the message turns visible on the server again (a
            conservative estimate, refreshed by every visibility change).
    """

    __slots__ = ("deadline",)

    def __init__(
        self,
        *,
        deadline: float,
        queue: str,
        body: bytes,
        headers: dict[str, object],
        message_id: str,
        attempt: int,
        key: str | None = None,
    ) -> None:
        super().__init__(queue=queue, body=body, headers=headers, message_id=message_id, attempt=attempt, key=key)
        self.deadline = deadline


D = TypeVar("D", bound=PolledDelivery)


class Backoff:
    """A doubling pause between ``initial`` and ``maximum`` seconds; :meth:`reset` starts over.

    Example:
        >>> b = Backoff(0.5, 3.0)
        >>> [b.next() for _ in range(4)]
        [0.5, 1.0, 2.0, 3.0]
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self._current = initial

    def next(self) -> float:
        """The pause to take now; the one after it is twice as long (at most ``maximum``)."""
        pause = self._current
        self._current = min(self.maximum, self._current * 2)
        return pause

    def reset(self) -> None:
        self._current = self.initial


class PollingSubscription(Subscription, Generic[D]):
    """Pollers keep up to ``prefetch`` messages received; ``__anext__`` hands them out in receive order.

    Class attributes a backend sets:
        log: the backend's logger (outage warnings, give-back failures).
        max_batch: most messages one receive call returns.
        close_wait: seconds :meth:`close` waits for a receive in flight before cancelling it.

    Attributes:
        queue: the queue this subscription reads.
        prefetch: most messages held (buffered and handed out, unsettled).
        polls: receive calls that returned.
        empty_polls: receive calls that returned no message.
        expired: buffered messages whose visibility lapsed before they were handed out (dropped).
    """

    log: ClassVar[logging.Logger] = logging.getLogger("taskstream.brokers")
    max_batch: ClassVar[int] = 10
    close_wait: ClassVar[float] = 10.0

    def __init__(
        self,
        queue: str,
        prefetch: int,
        *,
        visibility_timeout: float,
        pollers: int = 1,
        low_water: int = 1,
        backoff: Backoff | None = None,
    ) -> None:
        """Set up (pollers start with the first ``__anext__``, or :meth:`_start`).

        Args:
            queue: the queue to read.
            prefetch: most messages held at once (buffered and handed out, unsettled).
            visibility_timeout: seconds a received message stays invisible (buffered ones are kept so).
            pollers: receive loops running at once.
            low_water: a receive starts only when at least this many prefetch slots are free.
            backoff: pauses after failed receives (default 0.2 s doubling up to 5 s).

        Raises:
            ConfigurationError: ``prefetch`` is below 1.
        """
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, got {prefetch}")
        self.queue = queue
        self.prefetch = prefetch
        self.visibility_timeout = visibility_timeout
        self.polls = 0
        self.empty_polls = 0
        self.expired = 0
        self._pollers = max(1, pollers)
        self._low_water = max(1, low_water)
        self._buffer: collections.deque[D] = collections.deque()
        self._unsettled: set[D] = set()  # buffered and handed out, not settled
        self._reserved = 0  # slots promised to receives in flight
        self._ready = asyncio.Event()  # for __anext__: buffer filled, closed, failed
        self._space = asyncio.Event()  # for pollers: a slot freed, closed
        self._wakeup = asyncio.Event()  # for pollers' pauses: work announced, closed
        self._tasks: list[asyncio.Task[None]] = []
        self._keeper: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._failing = False
        self._backoff = backoff or Backoff(0.2, 5.0)

    # -- what a backend implements ------------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Run once before the first receive (look the queue up, say); an error that :meth:`_classify` calls
        fatal fails the subscription, any other is retried with the receives' back-off."""

    @abc.abstractmethod
    async def _receive(self, count: int) -> Sequence[D]:
        """One receive call for at most ``count`` messages, made invisible for ``visibility_timeout``."""

    @abc.abstractmethod
    async def _set_visibility(self, delivery: D, seconds: float) -> None:
        """Make ``delivery`` invisible for ``seconds`` from now (0: visible at once); update its deadline."""

    def _classify(self, exc: Exception) -> BaseException | None:
        """``None`` when a failed receive is worth retrying, else the error that fails the subscription."""
        return exc

    def _describe(self, exc: BaseException) -> str:
        """A short, secret-free description of ``exc`` for the log."""
        return str(exc)

    def _is_gone(self, exc: BaseException) -> bool:
        """The message of a failed visibility change is no longer ours (deleted, or visible again)."""
        return False

    def _admit(self, delivery: D) -> bool:
        """Whether a received delivery joins the buffer (``False``: the backend dealt with a copy)."""
        return True

    async def _after_receive(self, count: int) -> None:
        """Called after each successful receive with the number of messages it returned (pause if idle)."""

    async def _stop_pollers(self) -> None:
        """On close: let a receive in flight end (it gives its messages back), cancel it after ``close_wait``.

        A backend whose receives cannot be cancelled on the server without stranding messages may instead
        hand the pollers to its broker, to be waited for there.
        """
        running = [task for task in self._tasks if not task.done()]
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=self.close_wait)
        for task in late:  # a hung receive: its messages come back when their visibility lapses
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- iteration ----------------------------------------------------------------------------------------

    async def __anext__(self) -> D:
        while True:
            now = time.monotonic()
            while self._buffer:
                delivery = self._buffer.popleft()
                if delivery.settled:
                    continue
                if delivery.deadline <= now:
                    # Visible on the server again (maybe with someone else): handing it out would run it twice.
                    self.expired += 1
                    delivery.settled = True
                    self._release(delivery)
                    continue
                return delivery
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            if not self._tasks:
                self._start()
            self._ready.clear()
            await self._ready.wait()

    @property
    def buffered(self) -> int:
        """Messages received and not yet handed out (kept invisible by this subscription)."""
        return len(self._buffer)

    def _start(self) -> None:
        if self._tasks or self._closed:
            return
        kind = type(self).__name__
        for index in range(self._pollers):
            self._tasks.append(asyncio.create_task(self._poll(), name=f"{kind}-receive:{self.queue}:{index}"))
        self._keeper = asyncio.create_task(self._keep_buffer_hidden(), name=f"{kind}-buffer:{self.queue}")

    def _release(self, delivery: D) -> None:
        """``delivery`` is settled (or lost): its prefetch slot is free."""
        self._unsettled.discard(delivery)
        self._space.set()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._ready.set()

    # -- polling ------------------------------------------------------------------------------------------

    def _free(self, now: float) -> int:
        held = sum(1 for delivery in self._unsettled if delivery.deadline > now)
        return self.prefetch - held - self._reserved

    async def _wait_for_space(self, now: float) -> None:
        """Until a delivery settles, or the next visibility deadline passes."""
        self._space.clear()
        deadlines = [delivery.deadline for delivery in self._unsettled if delivery.deadline > now]
        timeout = max(0.05, min(deadlines) - now) if deadlines else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._space.wait()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by :meth:`_wake` or close (a wake-up during the last receive counts too)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _poll(self) -> None:
        while not self._closed:
            try:
                await self._prepare()
                break
            except Exception as exc:
                fatal = self._classify(exc)  # an outage is waited out with back-off, as for a receive
                if fatal is not None:
                    self._fail(fatal)
                    return
                await self._pause(self._outage(exc))
        while not self._closed:
            now = time.monotonic()
            wanted = min(self.max_batch, self._free(now))
            if wanted < self._low_water:  # fuller receives: fewer calls for the same messages
                await self._wait_for_space(now)
                continue
            self._reserved += wanted
            self._wakeup.clear()  # wake-ups from here on cut the pause that follows this receive
            try:
                deliveries = await self._receive(wanted)
            except Exception as exc:
                self._reserved -= wanted
                fatal = self._classify(exc)
                if fatal is not None:
                    self._fail(fatal)
                    return
                await self._pause(self._outage(exc))
                continue
            except BaseException:
                self._reserved -= wanted
                raise
            self._reserved -= wanted
            self._recovered()
            if self._closed:  # closed while this receive was in flight: give its messages straight back
                await self._give_back(deliveries)
                return
            self._accept(deliveries)
            await self._after_receive(len(deliveries))

    def _accept(self, deliveries: Sequence[D]) -> None:
        self.polls += 1
        if not deliveries:
            self.empty_polls += 1
            return
        for delivery in deliveries:
            if self._admit(delivery):
                self._unsettled.add(delivery)
                self._buffer.append(delivery)
        self._ready.set()

    def _outage(self, exc: Exception) -> float:
        """Log a failed receive (one warning per outage) and return the pause before the next."""
        pause = self._backoff.next()
        if not self._failing:
            self._failing = True
            self.log.warning(
                "receive from %r failed; retrying with back-off until it works again: %s",
                self.queue,
                self._describe(exc),
            )
        else:
            self.log.debug(
                "receive from %r failed again (retrying in %.1f s): %s", self.queue, pause, self._describe(exc)
            )
        return pause

    def _recovered(self) -> None:
        self._backoff.reset()
        if self._failing:
            self._failing = False
            self.log.info("receives from %r work again", self.queue)

    async def _keep_buffer_hidden(self) -> None:
        """Extend messages received ahead that wait in the buffer, so waiting does not cost them an attempt."""
        timeout = self.visibility_timeout
        while not self._closed:
            await asyncio.sleep(max(0.2, timeout / 3))
            now = time.monotonic()
            due = [d for d in self._buffer if not d.settled and d.deadline - now < timeout * 2 / 3]
            results = await asyncio.gather(*(self._set_visibility(d, timeout) for d in due), return_exceptions=True)
            for delivery, result in zip(due, results, strict=True):
                if isinstance(result, BaseException):
                    self.log.debug(
                        "could not extend buffered message %s: %s", delivery.message_id, self._describe(result)
                    )

    # -- closing ------------------------------------------------------------------------------------------

    async def _give_back(self, deliveries: Sequence[D]) -> None:
        """Make ``deliveries`` visible again at once; a failure only delays them (their visibility lapses)."""
        for delivery in deliveries:
            delivery.settled = True
        results = await asyncio.gather(*(self._set_visibility(d, 0) for d in deliveries), return_exceptions=True)
        for delivery, result in zip(deliveries, results, strict=True):
            if isinstance(result, BaseException) and not self._is_gone(result):
                self.log.warning(
                    "could not return message %s to %r on close (it returns after its visibility timeout): %s",
                    delivery.message_id,
                    self.queue,
                    self._describe(result),
                )

    async def close(self) -> None:
        """Stop receiving and give back every message received and not settled."""
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        self._space.set()
        self._wakeup.set()
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._tasks:
            await asyncio.sleep(0)  # pollers waiting for space or pausing see the close and end
            await self._stop_pollers()
        leftovers = [d for d in self._unsettled if not d.settled]
        self._buffer.clear()
        self._unsettled.clear()
        if leftovers:
            await self._give_back(leftovers)
