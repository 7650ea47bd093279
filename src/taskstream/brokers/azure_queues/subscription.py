"""Reading an Azure queue: one poller over the shared polling base; settles by pop receipt."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from azure.core.exceptions import AzureError, HttpResponseError
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient

from taskstream.brokers.azure_queues.config import MAX_PAGE, MIN_POLL_DELAY
from taskstream.brokers.azure_queues.errors import describe, error_code, is_transient, map_error, whole_seconds
from taskstream.brokers.polling import Backoff, PolledDelivery, PollingSubscription

if TYPE_CHECKING:
    from taskstream.brokers.azure_queues.broker import AzureQueueBroker

__all__ = ["AzureQueueDelivery", "AzureQueueSubscription"]

log = logging.getLogger("taskstream.brokers.azure")

T = TypeVar("T")
_LEASE_LOST = ("PopReceiptMismatch", "MessageNotFound")


class AzureQueueDelivery(PolledDelivery):
    """A received Azure message with its Azure id and newest pop receipt.

    Every broker call on one delivery runs one at a time and is never abandoned half-way (a cancelled caller
    still lets the call finish), so the pop receipt held here is always the newest one.
    """

    __slots__ = ("_azure_id", "_lock", "_receipt", "_sub")

    def __init__(
        self,
        sub: AzureQueueSubscription,
        message: QueueMessage,
        *,
        body: bytes,
        headers: dict[str, Any],
        message_id: str,
        key: str | None,
    ) -> None:
        super().__init__(
            deadline=time.monotonic() + sub.broker.visibility_timeout,
            queue=sub.queue,
            body=body,
            headers=headers,
            message_id=message_id,
            attempt=int(message.dequeue_count or 1),
            key=key,
        )
        self._sub = sub
        self._azure_id: str = message.id
        self._receipt: str = message.pop_receipt or ""
        self._lock = asyncio.Lock()

    async def _serial(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            task = asyncio.ensure_future(call())
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    await asyncio.wait([task])  # keep the lock until the receipt is recorded
                raise

    async def _set_visibility(self, seconds: int) -> None:
        updated = await self._sub.client.update_message(self._azure_id, self._receipt, visibility_timeout=seconds)
        self._receipt = updated.pop_receipt or self._receipt
        self.deadline = time.monotonic() + seconds

    async def _delete(self) -> None:
        await self._sub.client.delete_message(self._azure_id, self._receipt)

    def _lease_lost(self, exc: HttpResponseError, action: str) -> bool:
        code = error_code(exc)
        if code in _LEASE_LOST:
            log.warning(
                "%s of message %s on %r failed: %s (its visibility lapsed; it is delivered again)",
                action,
                self.message_id,
                self.queue,
                code,
            )
            return True
        return False

    async def _settle(self, action: str, call: Callable[[], Awaitable[None]]) -> None:
        """Run one settling call (or an extension), mapping errors; a lost lease only logs."""
        try:
            await self._serial(call)
        except HttpResponseError as exc:
            if not self._lease_lost(exc, action):
                raise map_error(exc, f"{action} on {self.queue!r}", self.queue) from exc
        except AzureError as exc:
            raise map_error(exc, f"{action} on {self.queue!r}", self.queue) from exc

    async def _ack(self) -> None:
        try:
            await self._settle("ack", self._delete)
        finally:
            self._sub._release(self)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        wait = whole_seconds(delay)
        try:
            if requeue:
                await self._settle("nack", lambda: self._set_visibility(wait))
                self._sub.broker._wake(self.queue, after=wait)
            else:
                await self._settle("nack", self._delete)
        finally:
            self._sub._release(self)

    async def _extend(self, seconds: float) -> None:
        visibility = max(1, whole_seconds(seconds))
        await self._settle("extend", lambda: self._set_visibility(visibility))


class AzureQueueSubscription(PollingSubscription[AzureQueueDelivery]):
    """A consumer of one Azure queue: a background poller fills a buffer the iterator drains.

    Azure has no long polling: an empty queue is polled after 0.05 s, then twice as long each time up to the
    broker's ``poll_interval``; any received message, and :meth:`wake`, reset the delay. Prefetch, keep-alive
    of buffered messages, back-off and give-back on close are the polling base's.

    Attributes:
        idle_delay: the current sleep between polls of an empty queue (seconds).
    """

    log: ClassVar[logging.Logger] = log
    max_batch: ClassVar[int] = MAX_PAGE

    def __init__(self, broker: AzureQueueBroker, queue: str, client: QueueClient, prefetch: int) -> None:
        super().__init__(
            queue,
            prefetch,
            visibility_timeout=broker.visibility_timeout,
            backoff=Backoff(0.5, max(broker.poll_interval, 5.0)),
        )
        self.broker = broker
        self.client = client
        self.idle_delay = MIN_POLL_DELAY
        self._start()  # receive ahead from the start

    def wake(self) -> None:
        """Poll now and restart the idle back-off (work was announced on this queue)."""
        self.idle_delay = MIN_POLL_DELAY
        self._wake()

    async def _receive(self, count: int) -> Sequence[AzureQueueDelivery]:
        messages = await self.broker._receive(self.client, count)
        return [self.broker._delivery(self, message) for message in messages]

    def _classify(self, exc: Exception) -> BaseException | None:
        if is_transient(exc):
            return None
        mapped = map_error(exc, f"receive from {self.queue!r}", self.queue)
        mapped.__cause__ = exc
        return mapped

    def _describe(self, exc: BaseException) -> str:
        return describe(exc)

    def _is_gone(self, exc: BaseException) -> bool:
        return error_code(exc) in _LEASE_LOST

    async def _after_receive(self, count: int) -> None:
        if count:
            self.idle_delay = MIN_POLL_DELAY
            return
        delay = self.idle_delay
        self.idle_delay = min(self.broker.poll_interval, self.idle_delay * 2)
        await self._pause(delay)

    async def _set_visibility(self, delivery: AzureQueueDelivery, seconds: float) -> None:
        visibility = whole_seconds(seconds)
        await delivery._serial(lambda: delivery._set_visibility(visibility))

    async def close(self) -> None:
        await super().close()
        self.broker._subscriptions.discard(self)
