"""The Broker protocol every backend implements, and ``broker_from_url``.

A backend is small: connect/close, declare, publish, consume, purge, depth (and queue_stats where the broker
says more than a depth). Everything shared (retries,
dead-letter routing with reasons, visibility heartbeats, claim-check, metrics) lives above it in
:mod:`taskstream.consumer` and :mod:`taskstream.producer`, never in a backend.

Semantics every backend meets (checked by ``tests/brokers/contract``):

* At-least-once: a message leaves the queue only on :meth:`Delivery.ack`. A consumer that dies or closes
  without acking gets its messages redelivered, with :attr:`Delivery.attempt` one higher.
* ``nack(requeue=True, delay=d)`` makes the message visible again (after ``d`` seconds).
  ``nack(requeue=False)`` drops it (the runtime dead-letters *before* dropping, so nothing is lost).
* ``extend(seconds)`` keeps a message invisible that long from now (visibility-timeout brokers); a no-op
  where messages are held until ack.
* ``publish`` returns once the broker has the message ("published" means "the broker has it").
* Over ``capabilities.max_message_bytes`` a publish raises :class:`MessageTooLarge`, never a silent drop.
* ``queue_stats(queue)`` gives a :class:`QueueStats`: the depth (ready and delayed messages; in-flight ones too
  where ``capabilities.depth_counts_in_flight``), the messages in flight where ``capabilities.reports_in_flight``
  and the consumers attached where ``capabilities.reports_consumers``; ``None`` for what the broker does not say.
  The default reads :meth:`Broker.depth` only.

URL schemes (imports are lazy, a missing extra names its ``pip install``):

==================  ==========================================  ==================
Scheme              Backend                                     Extra
==================  ==========================================  ==================
``memory://[hub]``  embedded, in-process (default)              none
``amqp://``         RabbitMQ via aio-pika (``amqps://`` too)     ``rabbitmq``
``sqs://``          AWS SQS via aiobotocore                     ``sqs``
``azurequeue://``   Azure Storage Queues                        ``azure``
``zmq://``          ZeroMQ queue device                         ``zmq``
==================  ==========================================  ==================
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from taskstream.errors import NotSupported
from taskstream.schemes import Backend, load_backend
from taskstream.settings import Settings

__all__ = [
    "Broker",
    "Capabilities",
    "Delivery",
    "OutgoingMessage",
    "QueueStats",
    "Subscription",
    "broker_from_url",
    "dead_letter_name",
]

Headers = dict[str, Any]


def dead_letter_name(queue: str) -> str:
    """The default dead-letter queue of ``queue``: ``<queue>.dlq`` (FIFO names keep their ``.fifo`` suffix)."""
    if queue.endswith(".fifo"):
        return queue[: -len(".fifo")] + "-dlq.fifo"
    return f"{queue}.dlq"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do. Frozen data; the runtime and the tests read it, nothing else guesses.

    Attributes:
        name: short backend name for messages and logs.
        max_message_bytes: largest encoded message body the broker takes.
        durable: messages survive a broker restart.
        ordered: one consumer sees messages in publish order (FIFO queues; per key where ``key`` is used).
        fanout: topic pub/sub (``declare(..., topics=...)`` and ``publish_topic``).
        visibility_timeout: seconds an unacked message stays hidden before it returns by itself; ``None``
            where the broker holds it until ack or until the consumer's connection closes.
        max_batch: most messages one ``publish_batch`` call sends in one broker request.
        max_delay: the longest delay the broker supports, in seconds.
        in_process: the broker lives inside this process (the embedded memory broker): no other process can
            reach it, so task workers run inside the submitting program.
        reports_in_flight: :meth:`Broker.queue_stats` says how many messages are in flight (received, unsettled).
        reports_consumers: :meth:`Broker.queue_stats` says how many consumers are attached.
        depth_counts_in_flight: :meth:`Broker.depth` counts in-flight messages too (Azure's approximate count).
    """

    name: str
    max_message_bytes: int
    durable: bool
    ordered: bool
    fanout: bool
    visibility_timeout: float | None
    max_batch: int = 100
    max_delay: float = 12 * 3600.0
    in_process: bool = False
    reports_in_flight: bool = False
    reports_consumers: bool = False
    depth_counts_in_flight: bool = False


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Figures of one queue as its broker reports them (:meth:`Broker.queue_stats`); ``None``: not said.

    Attributes:
        depth: messages waiting: ready and delayed ones, and in-flight ones too where the broker's
            ``capabilities.depth_counts_in_flight`` (the same figure as :meth:`Broker.depth`).
        in_flight: messages handed to consumers and not yet settled (``capabilities.reports_in_flight``).
        consumers: consumers attached to the queue (``capabilities.reports_consumers``).
    """

    depth: int | None
    in_flight: int | None
    consumers: int | None


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message for :meth:`Broker.publish_batch`."""

    body: bytes
    headers: Headers = field(default_factory=dict)
    message_id: str | None = None
    key: str | None = None
    delay: float | None = None


class Delivery(abc.ABC):
    """One received message. Exactly one of ``ack``/``nack`` settles it; later calls are ignored.

    Attributes:
        queue: the queue it came from.
        body: the raw bytes as published.
        headers: broker headers (string keys, JSON-compatible values).
        message_id: the publisher's id (or the broker's when the publisher gave none).
        key: partition/group key when the message had one.
        attempt: 1 on first delivery, +1 on each redelivery.
    """

    __slots__ = ("attempt", "body", "headers", "key", "message_id", "queue", "settled")

    def __init__(
        self,
        *,
        queue: str,
        body: bytes,
        headers: Headers,
        message_id: str,
        attempt: int,
        key: str | None = None,
    ) -> None:
        self.queue = queue
        self.body = body
        self.headers = headers
        self.message_id = message_id
        self.attempt = attempt
        self.key = key
        self.settled = False

    async def ack(self) -> None:
        """Remove the message from the queue for good."""
        if self.settled:
            return
        self.settled = True
        await self._ack()

    async def nack(self, requeue: bool = True, delay: float | None = None) -> None:
        """Give the message back (``requeue=True``, optionally visible only after ``delay`` s) or drop it."""
        if self.settled:
            return
        self.settled = True
        await self._nack(requeue, delay)

    async def extend(self, seconds: float) -> None:
        """Keep the message invisible for ``seconds`` from now. No-op where messages are held until ack."""
        if not self.settled:
            await self._extend(seconds)

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _nack(self, requeue: bool, delay: float | None) -> None: ...

    async def _extend(self, seconds: float) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} queue={self.queue!r} id={self.message_id!r} attempt={self.attempt}>"


class Subscription(abc.ABC):
    """An open consumer on one queue: an async iterator of deliveries.

    At most ``prefetch`` deliveries are unsettled at any time; iteration waits when the limit is reached.
    :meth:`close` stops receiving and returns every delivery that was received but not settled to the queue
    (promptly where the broker allows it, otherwise when its visibility timeout passes).
    """

    @abc.abstractmethod
    async def __anext__(self) -> Delivery: ...

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Broker(abc.ABC):
    """A connection to one broker. Use as ``async with broker_from_url(url) as broker: ...``."""

    capabilities: Capabilities

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close subscriptions (returning unacked messages) and the connection. Idempotent."""

    @abc.abstractmethod
    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        """Create ``queue`` if missing (idempotent).

        Args:
            queue: queue name.
            dead_letter: queue that receives messages the broker itself dead-letters (native DLQ).
            fifo: strict ordering (per ``key`` group where the broker groups).
            topics: bind the queue to these topic patterns (``"a.b"`` exact, ``"a.#"`` prefix);
                needs ``capabilities.fanout``.
        """

    @abc.abstractmethod
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
        """Put one message on ``queue``; returns when the broker has it."""

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Put many messages on ``queue``; backends override this to send in fewer requests."""
        for message in messages:
            await self.publish(
                queue,
                message.body,
                headers=message.headers,
                message_id=message.message_id,
                key=message.key,
                delay=message.delay,
            )

    async def publish_topic(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        """Deliver one message to every queue bound to a pattern that matches ``topic``."""
        raise NotSupported(f"the {self.capabilities.name} backend has no topic pub/sub")

    @abc.abstractmethod
    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        """Start consuming ``queue``. The queue must have been declared."""

    @abc.abstractmethod
    async def purge(self, queue: str) -> None:
        """Drop every ready message of ``queue``."""

    @abc.abstractmethod
    async def depth(self, queue: str) -> int:
        """Approximate number of ready (not in-flight) messages in ``queue``."""

    async def queue_stats(self, queue: str) -> QueueStats:
        """Depth, in-flight and consumer counts of ``queue``, each ``None`` where this broker does not say them.

        The default is :meth:`depth` alone; a backend whose broker says more overrides it (in one request where
        it can) and sets ``capabilities.reports_in_flight`` / ``reports_consumers`` to match.

        Raises:
            QueueNotFound: ``queue`` does not exist.
        """
        return QueueStats(await self.depth(queue), None, None)

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and its messages. Optional; used by tests and tools."""
        raise NotSupported(f"the {self.capabilities.name} backend cannot delete queues")

    def dead_letter_name(self, queue: str) -> str:
        """The dead-letter queue the runtime uses for ``queue`` on this backend.

        ``<queue>.dlq`` by default (:func:`dead_letter_name`); a backend whose platform has its own convention
        or stricter queue names overrides it (Azure Storage Queues: ``<queue>-poison``).
        """
        return dead_letter_name(queue)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def topic_matches(pattern: str, topic: str) -> bool:
    """``"a.b"`` matches exactly; ``"a.#"`` matches ``a`` and anything below ``a.``; ``"#"`` matches all."""
    if pattern == "#":
        return True
    if pattern.endswith(".#"):
        stem = pattern[:-2]
        return topic == stem or topic.startswith(stem + ".")
    return pattern == topic


# scheme -> (module, class, extra, driver module for the install hint)
#: URL scheme -> the broker class (imported on first use) and the extra its driver comes with.
_BACKENDS: dict[str, Backend] = {
    "memory": Backend("taskstream.brokers.memory:MemoryBroker", "memory"),
    "amqp": Backend("taskstream.brokers.rabbitmq:RabbitMQBroker", "RabbitMQ", "rabbitmq", "aio_pika", "aio-pika"),
    "amqps": Backend("taskstream.brokers.rabbitmq:RabbitMQBroker", "RabbitMQ", "rabbitmq", "aio_pika", "aio-pika"),
    "sqs": Backend("taskstream.brokers.sqs:SQSBroker", "SQS", "sqs", "aiobotocore", "aiobotocore"),
    "azurequeue": Backend(
        "taskstream.brokers.azure_queues:AzureQueueBroker",
        "Azure Storage Queues",
        "azure",
        "azure.storage.queue",
        "azure-storage-queue",
    ),
    "zmq": Backend("taskstream.brokers.zeromq:ZeroMQBroker", "ZeroMQ", "zmq", "zmq", "pyzmq"),
}


def broker_from_url(url: str, *, settings: Settings | None = None, **options: Any) -> Broker:
    """Build (not connect) the broker for ``url``; ``options`` override the URL's query parameters.

    ``settings`` reach the backends whose ``from_url`` takes them (SQS derives its redrive count from
    ``max_attempts``); a backend never reads the environment's settings itself.

    Example:
        >>> broker_from_url("memory://").capabilities.name
        'memory'

    Raises:
        ConfigurationError: unknown scheme (with a "did you mean"), or a bad URL.
        MissingExtraError: the backend's extra is not installed; the message names the ``pip install``.
    """
    cls = load_backend(_BACKENDS, url, what="broker", base=Broker)
    if settings is not None and "settings" in inspect.signature(cls.from_url).parameters:
        options["settings"] = settings
    broker: Broker = cls.from_url(url, **options)
    return broker
