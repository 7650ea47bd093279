"""The embedded memory broker: the default backend, with real queue semantics, in one process.

URL: ``memory://[hub]?visibility_timeout=30&max_message_bytes=16777216``. Brokers built with the same hub
name in one process share queues (an unnamed ``memory://`` gets a private hub).

================  ==========================================================================
Operation         How it works here
================  ==========================================================================
ack               removes the message from the in-flight table
nack(requeue)     back to the ready queue (after ``delay`` seconds by a loop timer), attempt + 1
nack(no requeue)  dropped (the runtime dead-letters it first)
extend            pushes the message's visibility deadline out
visibility        an unacked message returns when its deadline passes or its subscription closes
dead-letter       done by the consumer runtime (``<queue>.dlq``, reason in headers)
queue_stats       depth (ready + delayed), the in-flight table's size, the open subscriptions on the queue
size limit        ``max_message_bytes`` (16 MiB by default); over it ``MessageTooLarge``
topics            ``declare(q, topics=["a.#"])`` + ``publish_topic("a.b", ...)``
durability        none: messages live in this process
================  ==========================================================================

All state belongs to one event loop; call it from that loop (the App does).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from taskstream.brokers.base import Broker, Capabilities, Delivery, QueueStats, Subscription, topic_matches
from taskstream.constants import MEMORY_MAX_MESSAGE_BYTES
from taskstream.errors import BrokerConnectionError, ConfigurationError, MessageTooLarge, QueueNotFound
from taskstream.messages import new_id
from taskstream.urloptions import Option, URLOptions

__all__ = ["DEFAULT_VISIBILITY_TIMEOUT", "OPTIONS", "MemoryBroker"]

DEFAULT_VISIBILITY_TIMEOUT = 30.0

OPTIONS = URLOptions(
    "memory broker",
    [
        Option("visibility_timeout", "duration", DEFAULT_VISIBILITY_TIMEOUT, "seconds an unacked message stays hidden"),
        Option("max_message_bytes", "int", MEMORY_MAX_MESSAGE_BYTES, "largest body published"),
    ],
)


@dataclass(slots=True)
class _Message:
    body: bytes
    headers: dict[str, Any]
    message_id: str
    key: str | None
    deliveries: int = 0


@dataclass(slots=True)
class _InFlight:
    message: _Message
    owner: _MemorySubscription
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Queue:
    name: str
    ready: collections.deque[_Message] = field(default_factory=collections.deque)
    in_flight: dict[int, _InFlight] = field(default_factory=dict)
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)
    topics: list[str] = field(default_factory=list)
    delayed: int = 0
    consumers: int = 0

    def wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _Hub:
    """The queues of one named memory broker."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.tags = itertools.count(1)


_HUBS: weakref.WeakValueDictionary[str, _Hub] = weakref.WeakValueDictionary()


class _MemoryDelivery(Delivery):
    __slots__ = ("_broker", "_tag")

    def __init__(self, broker: MemoryBroker, queue: _Queue, tag: int, message: _Message) -> None:
        super().__init__(
            queue=queue.name,
            body=message.body,
            headers=dict(message.headers),
            message_id=message.message_id,
            attempt=message.deliveries,
            key=message.key,
        )
        self._broker = broker
        self._tag = tag

    async def _ack(self) -> None:
        self._broker._settle(self.queue, self._tag, requeue=False, delay=None)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        self._broker._settle(self.queue, self._tag, requeue=requeue, delay=delay)

    async def _extend(self, seconds: float) -> None:
        self._broker._extend(self.queue, self._tag, seconds)


class _MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker, queue: _Queue, prefetch: int) -> None:
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, got {prefetch}")
        self._broker = broker
        self._queue = queue
        self._prefetch = prefetch
        self._tags: set[int] = set()
        self._closed = False
        self._slot_freed: asyncio.Future[None] | None = None

    async def __anext__(self) -> Delivery:
        queue = self._queue
        while True:
            if self._closed:
                raise StopAsyncIteration
            if len(self._tags) >= self._prefetch:
                self._slot_freed = asyncio.get_running_loop().create_future()
                await self._slot_freed
                continue
            if queue.ready:
                message = queue.ready.popleft()
                return self._broker._lease(queue, message, self)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    queue.wake()  # pass the wake-up on to another consumer
                raise

    def _released(self, tag: int) -> None:
        self._tags.discard(tag)
        if self._slot_freed is not None and not self._slot_freed.done():
            self._slot_freed.set_result(None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.consumers -= 1
        for tag in list(self._tags):
            self._broker._settle(self._queue.name, tag, requeue=True, delay=None)
        for waiter in list(self._queue.waiters):
            if not waiter.done():
                waiter.set_result(None)
        if self._slot_freed is not None and not self._slot_freed.done():
            self._slot_freed.set_result(None)
        self._broker._subscriptions.discard(self)


class MemoryBroker(Broker):
    """In-process broker with at-least-once semantics. See the module docstring for the mapping."""

    def __init__(
        self,
        hub: str | None = None,
        *,
        visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        max_message_bytes: int = MEMORY_MAX_MESSAGE_BYTES,
    ) -> None:
        if visibility_timeout <= 0:
            raise ConfigurationError(f"visibility_timeout must be positive, got {visibility_timeout}")
        if hub:
            existing = _HUBS.get(hub)
            if existing is None:
                existing = _Hub()
                _HUBS[hub] = existing
            self._hub = existing
        else:
            self._hub = _Hub()
        self.hub_name = hub
        self.visibility_timeout = visibility_timeout
        self.capabilities = Capabilities(
            name="memory",
            max_message_bytes=max_message_bytes,
            durable=False,
            ordered=True,
            fanout=True,
            visibility_timeout=visibility_timeout,
            max_batch=1000,
            in_process=True,
            reports_in_flight=True,
            reports_consumers=True,
        )
        self._subscriptions: set[_MemorySubscription] = set()
        self._connected = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryBroker:
        """Build from ``memory://[hub]?options``; ``options`` override the query string.

        Raises:
            ConfigurationError: an unknown option (named, with a "did you mean") or a bad value.
        """
        parts = urlsplit(url)
        return cls(parts.netloc or None, **OPTIONS.parse(parts.query, options, url=url))

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        self._connected = False

    def _queue(self, name: str) -> _Queue:
        try:
            return self._hub.queues[name]
        except KeyError:
            raise QueueNotFound(f"memory queue {name!r} was never declared") from None

    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        q = self._hub.queues.get(queue)
        if q is None:
            q = self._hub.queues[queue] = _Queue(queue)
        for pattern in topics:
            if pattern not in q.topics:
                q.topics.append(pattern)

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.capabilities.max_message_bytes:
            raise MessageTooLarge(len(body), self.capabilities.max_message_bytes, "memory broker")

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        key: str | None = None,
        delay: float | None = None,
    ) -> None:
        if not self._connected:
            raise BrokerConnectionError("memory broker is not connected (use 'async with' or connect())")
        self._check_size(body)
        q = self._queue(queue)
        message = _Message(bytes(body), dict(headers or {}), message_id or new_id(), key)
        self._enqueue(q, message, delay)

    async def publish_topic(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        self._check_size(body)
        mid = message_id or new_id()
        for q in list(self._hub.queues.values()):
            if any(topic_matches(p, topic) for p in q.topics):
                self._enqueue(q, _Message(bytes(body), {**(headers or {}), "topic": topic}, mid, None), None)

    def _enqueue(self, q: _Queue, message: _Message, delay: float | None) -> None:
        if delay and delay > 0:
            q.delayed += 1

            def later() -> None:
                q.delayed -= 1
                q.ready.append(message)
                q.wake()

            asyncio.get_running_loop().call_later(delay, later)
            return
        q.ready.append(message)
        q.wake()

    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        q = self._queue(queue)
        subscription = _MemorySubscription(self, q, prefetch)
        q.consumers += 1
        self._subscriptions.add(subscription)
        return subscription

    def _lease(self, q: _Queue, message: _Message, owner: _MemorySubscription) -> Delivery:
        message.deliveries += 1
        tag = next(self._hub.tags)
        entry = _InFlight(message, owner)
        entry.timer = asyncio.get_running_loop().call_later(
            self.visibility_timeout, self._settle, q.name, tag, True, None
        )
        q.in_flight[tag] = entry
        owner._tags.add(tag)
        return _MemoryDelivery(self, q, tag, message)

    def _settle(self, queue: str, tag: int, requeue: bool, delay: float | None) -> None:
        q = self._hub.queues.get(queue)
        if q is None:
            return
        entry = q.in_flight.pop(tag, None)
        if entry is None:
            return  # already returned by its visibility timeout or its subscription closing
        if entry.timer is not None:
            entry.timer.cancel()
        entry.owner._released(tag)
        if requeue:
            self._enqueue(q, entry.message, delay)

    def _extend(self, queue: str, tag: int, seconds: float) -> None:
        q = self._hub.queues.get(queue)
        entry = q.in_flight.get(tag) if q else None
        if entry is None:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer = asyncio.get_running_loop().call_later(seconds, self._settle, queue, tag, True, None)

    async def purge(self, queue: str) -> None:
        self._queue(queue).ready.clear()

    async def depth(self, queue: str) -> int:
        q = self._queue(queue)
        return len(q.ready) + q.delayed

    async def queue_stats(self, queue: str) -> QueueStats:
        """Ready and delayed messages, the in-flight table's size and the open subscriptions of ``queue``."""
        q = self._queue(queue)
        return QueueStats(len(q.ready) + q.delayed, len(q.in_flight), q.consumers)

    async def delete_queue(self, queue: str) -> None:
        self._hub.queues.pop(queue, None)

    def __repr__(self) -> str:
        return f"<MemoryBroker hub={self.hub_name!r} queues={len(self._hub.queues)}>"
