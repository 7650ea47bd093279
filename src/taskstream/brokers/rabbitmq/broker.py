"""``RabbitMQBroker``: the Broker protocol over one robust AMQP connection, with pipelined publisher confirms.

Publishing lives here: ``basic.publish`` with ``mandatory`` (an unroutable message raises ``QueueNotFound``) and
an awaited confirm, many in flight at once; a publish whose confirm was lost with the connection is sent again
until ``publish_timeout``. The server's refusal of a message over its ``max_message_size`` becomes
``MessageTooLarge`` and the broker adopts that limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from taskstream.brokers.base import Broker, Capabilities, OutgoingMessage, QueueStats, Subscription
from taskstream.brokers.rabbitmq.channels import RETRYABLE, lost_with_channel, map_error, refused_size_limit
from taskstream.brokers.rabbitmq.codec import DELAY_HEADER, outgoing_properties, requeued_properties
from taskstream.brokers.rabbitmq.config import RabbitMQConfig, parse_url
from taskstream.brokers.rabbitmq.connection import ConnectionManager
from taskstream.brokers.rabbitmq.subscription import RabbitSubscription
from taskstream.brokers.rabbitmq.topology import DELAY_EXCHANGE, MAX_DELAY, Topology, is_transient
from taskstream.errors import BrokerConnectionError, BrokerError, MessageTooLarge, PublishError, QueueNotFound
from taskstream.settings import redact_url

__all__ = ["RabbitMQBroker"]

log = logging.getLogger("taskstream.brokers.rabbitmq")


class RabbitMQBroker(Broker):
    """A RabbitMQ broker reached over one robust AMQP connection (``docs/brokers.md`` has the AMQP mapping).

    Channels: one for publishing (confirm mode), one per subscription (its own QoS), one for declarations and
    queue management.

    Example:
        >>> broker = RabbitMQBroker.from_url("amqp://guest:guest@127.0.0.1:5672/?queue_type=quorum")
        >>> broker.config.queue_type
        'quorum'
    """

    def __init__(self, url: str, config: RabbitMQConfig | None = None) -> None:
        self.config = config or RabbitMQConfig()
        self._url = url
        self.capabilities = Capabilities(
            name="rabbitmq",
            max_message_bytes=self.config.max_message_bytes,
            durable=self.config.durable and self.config.persistent,
            ordered=True,
            fanout=True,
            visibility_timeout=None,
            max_batch=1000,
            max_delay=MAX_DELAY,
            reports_consumers=True,
        )
        self._delivery_mode = 2 if self.config.persistent else 1
        self._subscriptions: set[RabbitSubscription] = set()
        self._link = ConnectionManager(url, self.config, self._restored, self._wake_subscriptions)
        self._topology = Topology(self.config, self._link)
        self._batch_slots = asyncio.Semaphore(2)
        self._reconnect_listeners: list[Callable[[], None]] = []

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQBroker:
        """Build from ``amqp://user:pass@host:port/vhost?options``; ``options`` override the query string."""
        driver_url, config = parse_url(url, options)
        return cls(driver_url, config)

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {redact_url(self._url)} queue_type={self.config.queue_type}>"

    # -- connection -----------------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._link.connect()

    async def close(self) -> None:
        self._link.closed = True
        for subscription in list(self._subscriptions):
            with contextlib.suppress(Exception):
                await subscription.close()
        await self._link.close()

    async def _restored(self) -> None:
        await self._topology.replay()
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:
                log.exception("a RabbitMQ reconnect listener failed")

    def add_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the loop, without awaiting) after every reconnect, once queues are declared again.

        The task client uses it to read, from the result store, outcomes whose transient replies a broker
        restart may have dropped.
        """
        self._reconnect_listeners.append(listener)

    def remove_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (no-op if it is not registered)."""
        with contextlib.suppress(ValueError):
            self._reconnect_listeners.remove(listener)

    def _mode(self, queue: str) -> int:
        """The delivery mode for a message to ``queue``: reply queues are transient (see topology)."""
        return 1 if is_transient(queue, self.config) else self._delivery_mode

    def _wake_subscriptions(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.wake()

    # -- declarations and queue management ------------------------------------------------------------

    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        await self._topology.declare(queue, dead_letter=dead_letter, topics=topics)

    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        """A subscription on ``queue``; it opens its channel on the first ``__anext__``."""
        return RabbitSubscription(self, queue, prefetch)

    async def purge(self, queue: str) -> None:
        await self._topology.purge(queue)

    async def depth(self, queue: str) -> int:
        return await self._topology.depth(queue)

    async def queue_stats(self, queue: str) -> QueueStats:
        """Ready messages and consumers from a passive declare; unacked ones need the management API: ``None``."""
        ready, consumers = await self._topology.figures(queue)
        return QueueStats(ready, None, consumers)

    async def delete_queue(self, queue: str) -> None:
        await self._topology.delete(queue)

    # -- publishing -----------------------------------------------------------------------------------

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.capabilities.max_message_bytes:
            raise MessageTooLarge(len(body), self.capabilities.max_message_bytes, "rabbitmq")

    def _adopt_server_limit(self, limit: int) -> None:
        """The server refused a message over ``limit`` bytes: use that limit from now on if it is lower."""
        if limit < self.capabilities.max_message_bytes:
            log.warning(
                "RabbitMQ's max_message_size is %d bytes, below max_message_bytes=%d: using %d",
                limit,
                self.capabilities.max_message_bytes,
                limit,
            )
            self.capabilities = dataclasses.replace(self.capabilities, max_message_bytes=limit)

    async def _send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        mandatory: bool,
    ) -> None:
        """Publish and await the confirm; resend after a lost connection until ``publish_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.publish_timeout
        while True:
            channel: aiormq.abc.AbstractChannel | None = None
            try:
                channel = self._link.open_publish_channel()
                if channel is None:
                    async with asyncio.timeout_at(deadline):
                        channel = await self._link.publish_channel()
                result = await self._link.guard.wait(
                    channel,
                    cast(aiormq.Channel, channel).basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=mandatory,
                        wait=False,
                    ),
                    deadline,
                )
            except TimeoutError as exc:
                raise PublishError(
                    f"RabbitMQ did not confirm a message for {routing_key!r} within "
                    f"{self.config.publish_timeout} s (connection down?)"
                ) from exc
            except BrokerError:
                raise
            except amqp_errors.ChannelPreconditionFailed as exc:
                limit = refused_size_limit(exc, len(body))
                if limit is not None:
                    self._adopt_server_limit(limit)
                    raise MessageTooLarge(len(body), limit, "rabbitmq server") from exc
                if loop.time() >= deadline:
                    raise map_error(exc, f"RabbitMQ refused a publish to {routing_key!r}") from exc
                continue  # another publish broke the channel; it reopens
            except amqp_errors.DeliveryError as exc:
                raise PublishError(f"RabbitMQ refused (nacked) a message for {routing_key!r}") from exc
            except RETRYABLE as exc:
                if self._link.closed:
                    raise BrokerConnectionError("the RabbitMQ broker was closed during a publish") from exc
                if loop.time() >= deadline:
                    raise map_error(exc, f"cannot publish to RabbitMQ {routing_key!r}") from exc
                await asyncio.sleep(0.05)
                continue
            except amqp_errors.AMQPError as exc:
                raise map_error(exc, f"cannot publish to RabbitMQ {routing_key!r}") from exc
            except Exception as exc:
                if (
                    channel is None
                    or not lost_with_channel(exc, channel)
                    or self._link.closed
                    or loop.time() >= deadline
                ):
                    raise map_error(exc, f"cannot publish to RabbitMQ {routing_key!r}") from exc
                await asyncio.sleep(0.05)
                continue
            if isinstance(result, DeliveredMessage):
                raise QueueNotFound(
                    f"RabbitMQ returned a message for {routing_key!r} as unroutable: no such queue (declare it first)"
                    if not exchange
                    else f"RabbitMQ returned a message sent to exchange {exchange!r}: no queue bound"
                )
            return

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
        self._check_size(body)
        properties = outgoing_properties(headers, message_id, key, self._mode(queue))
        if delay is not None and delay > 0:
            await self._send_delayed(queue, body, properties, delay)
        else:
            await self._send("", queue, body, properties, mandatory=True)

    async def _send_delayed(self, queue: str, body: bytes, properties: spec.Basic.Properties, delay: float) -> None:
        # the delay queue would accept a message for a missing queue and drop it later: check the target now
        await self._topology.ensure_exists(queue)
        ms = await self._topology.delay_route(delay)
        table = dict(properties.headers or {})
        table[DELAY_HEADER] = ms
        properties.headers = table
        try:
            await self._send(DELAY_EXCHANGE, queue, body, properties, mandatory=True)
        except QueueNotFound:  # the delay queue expired since we declared it: declare again, once
            self._topology.forget_delay_route(ms)
            await self._topology.delay_route(delay)
            await self._send(DELAY_EXCHANGE, queue, body, properties, mandatory=True)

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Publish ``messages`` with every confirm in flight at once; raises the first failure."""
        if not messages:
            return
        for message in messages:
            self._check_size(message.body)
        async with self._batch_slots:
            await self._publish_batch(queue, messages)

    async def _publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if len(messages) == 1:  # a lone submit or reply: no gather, no task per message, one loop turn less
            await self._send_one(queue, messages[0])
            return
        results = await asyncio.gather(*(self._send_one(queue, m) for m in messages), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _send_one(self, queue: str, message: OutgoingMessage) -> None:
        properties = outgoing_properties(message.headers, message.message_id, message.key, self._mode(queue))
        if message.delay is not None and message.delay > 0:
            await self._send_delayed(queue, message.body, properties, message.delay)
        else:
            await self._send("", queue, message.body, properties, mandatory=True)

    async def publish_topic(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        self._check_size(body)
        await self._topology.declare_exchange(self.config.topic_exchange, "topic")
        properties = outgoing_properties({**(headers or {}), "topic": topic}, message_id, None, self._delivery_mode)
        await self._send(self.config.topic_exchange, topic, body, properties, mandatory=False)

    async def _republish(self, message: DeliveredMessage, queue: str, attempts: int, delay: float | None) -> None:
        """Publish a copy of a received message back onto ``queue`` carrying ``attempts`` (requeue-by-republish)."""
        properties = requeued_properties(message, attempts, self._delivery_mode)
        if delay is not None and delay > 0:
            await self._send_delayed(queue, message.body, properties, delay)
        else:
            await self._send("", queue, message.body, properties, mandatory=True)
