"""Exchanges, queues, bindings and delay buckets: declared on demand, remembered, replayed after a reconnect.

Every queue gets ``x-dead-letter-exchange`` = ``taskstream.dlx`` (routing key: the queue's name) and, on quorum
brokers, ``x-queue-type``; a queue that already exists with other arguments is used as it is, with a warning.
Delays go through the headers exchange ``taskstream.delay`` to one queue per delay bucket, whose TTL expires the
message back onto its queue through the default exchange.

Task reply queues (``ts-reply-*``, one per task client) are *transient* on classic brokers: not durable, and
the broker publishes to them with ``delivery_mode=1``. A reply is then routed without RabbitMQ's persistence
work; one lost with a broker restart is read by the task client from the result store after it reconnects
(the worker writes the record before it acks the request). See ``docs/architecture.md``, "Fast path".
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions as amqp_errors

from taskstream.brokers.rabbitmq.codec import DELAY_HEADER
from taskstream.brokers.rabbitmq.config import RabbitMQConfig
from taskstream.brokers.rabbitmq.connection import ConnectionManager
from taskstream.errors import BrokerError, ConfigurationError

__all__ = [
    "DELAY_EXCHANGE",
    "DELAY_QUEUE_PREFIX",
    "DLX_EXCHANGE",
    "MAX_DELAY",
    "TRANSIENT_QUEUE_PREFIX",
    "Topology",
    "delay_bucket_ms",
    "is_transient",
]

log = logging.getLogger("taskstream.brokers.rabbitmq")

DELAY_EXCHANGE = "taskstream.delay"
DELAY_QUEUE_PREFIX = "taskstream.delay."
DLX_EXCHANGE = "taskstream.dlx"
MAX_DELAY = 24 * 3600.0
_DELAY_MARGIN_MS = 3_600_000  # a delay queue outlives its TTL by an hour after its last use
TRANSIENT_QUEUE_PREFIX = "ts-reply-"  # the task clients' reply queues (taskstream.tasks.client)


def is_transient(queue: str, config: RabbitMQConfig) -> bool:
    """Whether ``queue`` is a task reply queue kept transient (non-durable, non-persistent messages).

    Only on classic queues: quorum queues are always durable, so there reply queues stay as they are.

    Example:
        >>> is_transient("ts-reply-abc", RabbitMQConfig()), is_transient("orders", RabbitMQConfig())
        (True, False)
    """
    return config.queue_type == "classic" and queue.startswith(TRANSIENT_QUEUE_PREFIX)


def delay_bucket_ms(delay: float) -> int:
    """Round ``delay`` seconds to its bucket in milliseconds (100 ms / 1 s / 10 s steps).

    Every message in a bucket has the same TTL, so none waits behind a longer one in its delay queue.

    Example:
        >>> delay_bucket_ms(0.23), delay_bucket_ms(42.4), delay_bucket_ms(250)
        (200, 42000, 250000)
    """
    ms = delay * 1000.0
    step = 100 if ms <= 10_000 else 1000 if ms <= 100_000 else 10_000
    return max(step, round(ms / step) * step)


@dataclass(slots=True)
class _Declared:
    """What ``declare`` did for one queue, replayed after a reconnect."""

    arguments: dict[str, Any] | None
    bindings: set[tuple[str, str]] = field(default_factory=set)
    dead_letter: str | None = None


class Topology:
    """What one broker declared, declared again after a reconnect; queue management on the admin channel."""

    def __init__(self, config: RabbitMQConfig, connection: ConnectionManager) -> None:
        self.config = config
        self._connection = connection
        self._declared: dict[str, _Declared] = {}
        self._seen: set[str] = set()  # queues known to exist (declared elsewhere)
        self._exchanges: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._delay_declared: dict[int, float] = {}

    # -- declarations ---------------------------------------------------------------------------------

    def _queue_arguments(self, queue: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-dead-letter-exchange": DLX_EXCHANGE, "x-dead-letter-routing-key": queue}
        if self.config.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        return arguments

    async def declare_exchange(self, name: str, kind: str = "direct", *, force: bool = False) -> None:
        """Declare exchange ``name`` once (again with ``force``), always durable."""
        if name in self._exchanges and not force:
            return
        kind = self._exchanges.get(name, (kind, None))[0]
        await self._connection.admin_call(
            f"cannot declare RabbitMQ exchange {name!r}",
            # shared by every process on the server: always durable, so any two configurations agree
            lambda ch: ch.exchange_declare(name, exchange_type=kind, durable=True),
        )
        self._exchanges[name] = (kind, None)

    async def _declare_queue(self, queue: str, arguments: dict[str, Any] | None) -> dict[str, Any] | None:
        """Declare ``queue``; an existing queue with other arguments is used as it is (with a warning)."""
        durable = (self.config.durable or self.config.queue_type == "quorum") and not is_transient(queue, self.config)
        admin_call = self._connection.admin_call
        try:
            await admin_call(
                f"cannot declare RabbitMQ queue {queue!r}",
                lambda ch: ch.queue_declare(queue, durable=durable, arguments=arguments),
            )
            return arguments
        except BrokerError as exc:
            if not isinstance(exc.__cause__, amqp_errors.ChannelPreconditionFailed):
                raise
            log.warning(
                "RabbitMQ queue %r exists with other arguments (%s); using it as it is "
                "(no taskstream dead-letter exchange on it)",
                queue,
                exc.__cause__,
            )
        await admin_call(f"cannot use RabbitMQ queue {queue!r}", lambda ch: ch.queue_declare(queue, passive=True))
        return None

    async def declare(self, queue: str, *, dead_letter: str | None = None, topics: Sequence[str] = ()) -> None:
        """Declare ``queue``, its dead-letter queue and binding, and its topic bindings (each once)."""
        if not queue or len(queue.encode()) > 255:
            raise ConfigurationError(f"RabbitMQ queue names are 1-255 bytes, got {queue!r}")
        entry = self._declared.get(queue)
        if entry is None:
            arguments = await self._declare_queue(queue, self._queue_arguments(queue))
            entry = self._declared[queue] = _Declared(arguments)
        if dead_letter and entry.dead_letter != dead_letter:
            await self.declare(dead_letter)
            await self.declare_exchange(DLX_EXCHANGE)
            await self._bind(dead_letter, DLX_EXCHANGE, queue)
            entry.dead_letter = dead_letter
        if topics:
            await self.declare_exchange(self.config.topic_exchange, "topic")
            for pattern in topics:
                await self._bind(queue, self.config.topic_exchange, pattern)
                entry.bindings.add((self.config.topic_exchange, pattern))

    async def _bind(self, queue: str, exchange: str, key: str) -> None:
        await self._connection.admin_call(
            f"cannot bind RabbitMQ queue {queue!r} to {exchange!r}",
            lambda ch: ch.queue_bind(queue, exchange, routing_key=key),
        )
        if exchange == DLX_EXCHANGE:
            return
        entry = self._declared.get(queue)
        if entry is not None:
            entry.bindings.add((exchange, key))

    # -- replay after a reconnect ---------------------------------------------------------------------

    async def redeclare(self, queue: str) -> None:
        """Declare ``queue`` again as it was, with its bindings and its dead-letter queue and binding."""
        entry = self._declared.get(queue)
        if entry is None:
            return
        admin_call = self._connection.admin_call
        await self._declare_queue(queue, entry.arguments)
        for exchange, key in list(entry.bindings):
            await self.declare_exchange(exchange)
            await self._rebind(queue, exchange, key)
        dead_letter = entry.dead_letter
        if dead_letter:
            await self.declare_exchange(DLX_EXCHANGE)
            target = self._declared.get(dead_letter)
            if target is not None:
                await self._declare_queue(dead_letter, target.arguments)
            await admin_call(
                f"cannot bind RabbitMQ queue {dead_letter!r}",
                lambda ch: ch.queue_bind(dead_letter, DLX_EXCHANGE, queue),
            )

    async def _rebind(self, queue: str, exchange: str, key: str) -> None:
        await self._connection.admin_call(
            f"cannot bind RabbitMQ queue {queue!r}", lambda ch: ch.queue_bind(queue, exchange, key)
        )

    async def replay(self) -> None:
        """Declare every exchange and queue again (after a reconnect); failures are logged, not raised."""
        for name in list(self._exchanges):
            with contextlib.suppress(Exception):  # the queues' replay below reports what still fails
                await self.declare_exchange(name, force=True)
        for queue in list(self._declared):
            try:
                await self.redeclare(queue)
            except Exception as exc:
                log.warning("could not declare RabbitMQ queue %r again after reconnect: %s", queue, exc)

    # -- delays ---------------------------------------------------------------------------------------

    async def delay_route(self, delay: float) -> int:
        """Make sure the delay queue of ``delay``'s bucket exists; returns the bucket in ms."""
        if delay > MAX_DELAY:
            raise ConfigurationError(f"delay of {delay} s is over the RabbitMQ backend's limit of {MAX_DELAY} s")
        ms = delay_bucket_ms(delay)
        declared = self._delay_declared.get(ms)
        now = time.monotonic()
        if declared is not None and now - declared < _DELAY_MARGIN_MS / 2000:
            return ms
        await self.declare_exchange(DELAY_EXCHANGE, "headers")
        name = f"{DELAY_QUEUE_PREFIX}{ms}"
        arguments = {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-expires": ms + _DELAY_MARGIN_MS}
        await self._connection.admin_call(
            f"cannot declare RabbitMQ delay queue {name!r}",
            lambda ch: ch.queue_declare(name, durable=True, arguments=arguments),
        )
        await self._connection.admin_call(
            f"cannot bind RabbitMQ delay queue {name!r}",
            lambda ch: ch.queue_bind(name, DELAY_EXCHANGE, "", arguments={"x-match": "all", DELAY_HEADER: ms}),
        )
        self._delay_declared[ms] = now
        return ms

    def forget_delay_route(self, ms: int) -> None:
        """The delay queue of bucket ``ms`` expired: the next :meth:`delay_route` declares it again."""
        self._delay_declared.pop(ms, None)

    # -- queue management -----------------------------------------------------------------------------

    async def ensure_exists(self, queue: str) -> None:
        """Raise ``QueueNotFound`` unless ``queue`` was declared here or is known to exist."""
        if queue not in self._declared and queue not in self._seen:
            await self.depth(queue)
            self._seen.add(queue)

    async def purge(self, queue: str) -> None:
        """Remove every ready message of ``queue``."""
        await self._connection.admin_call(
            f"cannot purge RabbitMQ queue {queue!r}", lambda ch: ch.queue_purge(queue), resend=False
        )

    async def depth(self, queue: str) -> int:
        """The number of ready messages of ``queue`` (``QueueNotFound`` if it does not exist)."""
        result = await self._connection.admin_call(
            f"cannot read the depth of RabbitMQ queue {queue!r}", lambda ch: ch.queue_declare(queue, passive=True)
        )
        return int(result.message_count or 0)

    async def figures(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of ``queue`` from one passive declare (``QueueNotFound`` if missing)."""
        result = await self._connection.admin_call(
            f"cannot read the figures of RabbitMQ queue {queue!r}", lambda ch: ch.queue_declare(queue, passive=True)
        )
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def delete(self, queue: str) -> None:
        """Delete ``queue`` and forget its declaration."""
        self._declared.pop(queue, None)
        self._seen.discard(queue)
        await self._connection.admin_call(
            f"cannot delete RabbitMQ queue {queue!r}",
            lambda ch: ch.queue_delete(queue, if_unused=False, if_empty=False),
        )
