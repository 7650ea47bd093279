"""A consumer on its own channel, and its deliveries.

One channel per subscription with ``basic.qos(prefetch)`` and manual acks. A requeue republishes a copy that
carries the attempts so far (confirmed), then acks the original: the copy joins the tail of the queue.
:meth:`RabbitSubscription.close` gives back what it holds the same way. The channel reopens after a reconnect,
its queue is declared again and consuming resumes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any, cast

import aiormq
import aiormq.exceptions as amqp_errors
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from taskstream.brokers.base import Delivery, Subscription
from taskstream.brokers.rabbitmq.acks import AckBatcher
from taskstream.brokers.rabbitmq.channels import closed_without_reason, map_error
from taskstream.brokers.rabbitmq.codec import delivery_tag, read_received
from taskstream.errors import BrokerConnectionError, BrokerError, ConfigurationError, QueueNotFound
from taskstream.messages import new_id

if TYPE_CHECKING:
    from taskstream.brokers.rabbitmq.broker import RabbitMQBroker

__all__ = ["RabbitDelivery", "RabbitSubscription"]

log = logging.getLogger("taskstream.brokers.rabbitmq")


class RabbitDelivery(Delivery):
    """One received message; ``ack``/``nack`` go through its subscription."""

    __slots__ = ("_channel", "_message", "_prior", "_sub", "_tag")

    def __init__(
        self,
        sub: RabbitSubscription,
        message: DeliveredMessage,
        headers: dict[str, Any],
        attempt: int,
        prior: int,
        message_id: str,
        key: str | None,
    ) -> None:
        super().__init__(
            queue=sub.queue, body=message.body, headers=headers, message_id=message_id, attempt=attempt, key=key
        )
        self._sub = sub
        self._message = message
        self._channel = message.channel
        self._tag = delivery_tag(message)
        self._prior = prior

    async def _ack(self) -> None:
        written = self._sub._ack(self._channel, self._tag)
        if written is not None:
            await asyncio.shield(written)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        await self._sub._return(self, requeue=requeue, delay=delay, consumed=True)


class RabbitSubscription(Subscription):
    """A consumer on its own channel. Deliveries wait in ``_buffer`` until ``__anext__`` hands them out."""

    _tags = itertools.count(1)

    def __init__(self, broker: RabbitMQBroker, queue: str, prefetch: int) -> None:
        if not 1 <= prefetch <= 65535:
            raise ConfigurationError(f"prefetch must be between 1 and 65535 on RabbitMQ, got {prefetch}")
        self.broker = broker
        self.queue = queue
        self.prefetch = prefetch
        self._link = broker._link
        self._consumer_tag = f"taskstream.{queue}.{next(self._tags)}.{new_id()[:8]}"
        self._channel: AbstractRobustChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._consuming_on: aiormq.abc.AbstractChannel | None = None  # the channel whose consume succeeded
        self._buffer: collections.deque[DeliveredMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BrokerError | None = None
        self._acks = AckBatcher(queue, self._link.guard)
        self._handed: dict[int, RabbitDelivery] = {}
        self._resuming: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def _start(self) -> None:
        """Open the channel and start consuming; while the connection is down, wait for it (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.broker.config.reconnect_timeout
        while True:
            connection = await self._link.ready()
            channel: AbstractRobustChannel | None = None
            try:
                # inside the try: a connection cut just now has no transport ("Connection was not opened")
                channel = connection.channel(publisher_confirms=False)
                await channel.initialize()
                await channel.set_qos(prefetch_count=self.prefetch)
                self._channel = channel
                await self._consume(await channel.get_underlay_channel())
                break
            except asyncio.CancelledError:
                if channel is not None:
                    with contextlib.suppress(Exception):
                        await channel.close()
                raise
            except Exception as exc:
                self._channel = None
                if channel is not None:
                    with contextlib.suppress(Exception):
                        await channel.close()
                refused = isinstance(exc, amqp_errors.AMQPChannelError) and not closed_without_reason(exc)
                if refused or loop.time() >= deadline:
                    raise map_error(exc, f"cannot consume RabbitMQ queue {self.queue!r}") from exc
                log.info("cannot consume RabbitMQ queue %r yet (%s); retrying", self.queue, exc)
                await asyncio.sleep(0.5)
        channel.reopen_callbacks.add(self._on_reopen)
        self.broker._subscriptions.add(self)

    async def _consume(self, underlay: aiormq.abc.AbstractChannel) -> None:
        if underlay is self._consuming_on:
            return  # already consuming on this channel (an earlier resume got there first)
        if underlay is not self._underlay:
            self._underlay = underlay
            self._acks.reset(underlay)
            underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        consumers = cast(aiormq.Channel, underlay).consumers
        if self._consumer_tag in consumers:
            # An earlier consume on this channel was cut short: aiormq keeps its tag (a second consume would
            # raise DuplicateConsumerTag) and whether the server registered it is unknown; cancel, then consume.
            await underlay.basic_cancel(self._consumer_tag)
            consumers.pop(self._consumer_tag, None)
        await underlay.basic_consume(self.queue, self._on_message, consumer_tag=self._consumer_tag)
        self._consuming_on = underlay

    async def _on_reopen(self, channel: Any) -> None:
        # Not awaited here: aio-pika awaits this inside its reconnect loop; a resume that waits on a connection
        # lost meanwhile would hold that loop (no next reconnect) until its timeout.
        if self._closed or self._channel is None:
            return
        self._stop_resuming()
        self._resuming = asyncio.get_running_loop().create_task(self._resume(self._channel))

    async def _resume(self, channel: AbstractRobustChannel) -> None:
        """Declare the queue again and consume on the reopened channel; a refusal (queue gone) fails the
        subscription, a connection that breaks again leaves it to the next reopen."""
        while not self._closed:
            try:
                await self.broker._topology.redeclare(self.queue)
                await self._consume(await channel.get_underlay_channel())
                log.info("consumer on RabbitMQ queue %r resumed after a reconnect", self.queue)
                return
            except Exception as exc:
                if channel.is_closed or self._link.gone is not None:
                    return  # the next reopen resumes, or the subscription wakes to the broker's end
                refused = (isinstance(exc, amqp_errors.AMQPChannelError) and not closed_without_reason(exc)) or (
                    isinstance(exc, BrokerError) and not isinstance(exc, BrokerConnectionError)
                )
                if refused:  # the queue is gone or access was refused: that does not pass with a reconnect
                    self._fail(
                        exc
                        if isinstance(exc, BrokerError)
                        else map_error(exc, f"cannot resume consuming RabbitMQ queue {self.queue!r}")
                    )
                    return
                log.info("consumer on RabbitMQ queue %r not resumed yet (%s); retrying", self.queue, exc)
                await asyncio.sleep(0.5)

    def _stop_resuming(self) -> None:
        resuming, self._resuming = self._resuming, None
        if resuming is not None and not resuming.done():
            resuming.cancel()

    def _on_cancelled(self, frame: Any) -> None:
        if getattr(frame, "consumer_tag", None) == self._consumer_tag and not self._closed:
            self._fail(QueueNotFound(f"RabbitMQ cancelled the consumer on {self.queue!r} (was the queue deleted?)"))

    def _fail(self, error: BrokerError) -> None:
        self._failure = error
        self.wake()

    def wake(self) -> None:
        """Wake ``__anext__`` so it sees a new message, a failure, a close or the broker gone."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _on_message(self, message: DeliveredMessage) -> None:
        if message.channel is not self._underlay:
            return  # a late delivery of a channel that is gone: the broker requeued it
        self._acks.received(delivery_tag(message))
        self._buffer.append(message)
        self.wake()

    # -- iteration ------------------------------------------------------------------------------------

    async def __anext__(self) -> Delivery:
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start())
        if not self._start_task.done():
            await asyncio.shield(self._start_task)
        self._start_task.result()
        buffer = self._buffer
        while True:
            if self._closed:
                raise StopAsyncIteration
            while buffer:
                message = buffer.popleft()
                if message.channel is not self._underlay or message.channel.is_closed:
                    continue  # its channel died: the broker redelivers it
                return self._delivery(message)
            if self._failure is not None:
                raise self._failure
            if self._link.gone is not None:
                raise self._link.gone
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _delivery(self, message: DeliveredMessage) -> RabbitDelivery:
        received = read_received(message)
        delivery = RabbitDelivery(
            self,
            message,
            received.headers,
            attempt=received.prior + 1,
            prior=received.prior,
            message_id=message.header.properties.message_id or new_id(),
            key=received.key,
        )
        self._handed[delivery._tag] = delivery
        return delivery

    # -- settling -------------------------------------------------------------------------------------

    def _ack(self, channel: aiormq.abc.AbstractChannel, tag: int) -> asyncio.Future[None] | None:
        """Queue an ack; the returned future resolves once it is handed to the connection."""
        if channel is not self._underlay:
            log.warning(
                "ack on RabbitMQ queue %r after its channel closed: the broker redelivers that message", self.queue
            )
            return None
        self._handed.pop(tag, None)
        return self._acks.ack(tag)

    async def _return(self, delivery: RabbitDelivery, *, requeue: bool, delay: float | None, consumed: bool) -> None:
        """Give a delivery back: republish a copy carrying the attempt count, then ack the original."""
        channel = delivery._channel
        tag = delivery._tag
        self._handed.pop(tag, None)
        if channel is not self._underlay or channel.is_closed:
            log.warning("nack on RabbitMQ queue %r after its channel closed: the broker redelivers", self.queue)
            return
        if not requeue:
            await self._settle_directly(channel, tag, "reject")
            return
        attempts = delivery._prior + (1 if consumed else 0)
        try:
            await self.broker._republish(delivery._message, self.queue, attempts, delay)
        except Exception as exc:
            log.warning(
                "could not requeue a copy on RabbitMQ queue %r (%s); requeueing the original instead", self.queue, exc
            )
            await self._settle_directly(channel, tag, "nack")
            return
        written = self._ack(channel, tag)
        if written is not None:
            await asyncio.shield(written)

    async def _settle_directly(self, channel: aiormq.abc.AbstractChannel, tag: int, how: str) -> None:
        try:
            guard = self._link.guard
            if how == "reject":
                await guard.wait(channel, channel.basic_reject(tag, requeue=False, wait=False))
            else:
                await guard.wait(channel, channel.basic_nack(tag, requeue=True, wait=False))
        except Exception as exc:
            log.warning("%s on RabbitMQ queue %r was lost (%s); the broker redelivers", how, self.queue, exc)
            return
        self._acks.settled(tag)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wake()
        self._stop_resuming()
        start = self._start_task
        if start is not None and not start.done():
            start.cancel()
            with contextlib.suppress(BaseException):
                await start
        channel = self._channel
        try:
            await self._give_back()
        finally:
            self._buffer.clear()
            self._handed.clear()
            self.broker._subscriptions.discard(self)
            if channel is not None:
                channel.reopen_callbacks.discard(self._on_reopen)
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _give_back(self) -> None:
        """Cancel the consumer and return what it holds (handed-out unsettled ones count as an attempt)."""
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            return
        with contextlib.suppress(Exception):
            await self._link.guard.wait(underlay, underlay.basic_cancel(self._consumer_tag))
        await asyncio.sleep(0)  # deliveries that arrived before the cancel reach the buffer
        # return what we hold: handed-out unsettled ones count as an attempt, buffered ones do not
        returns = [self._return(d, requeue=True, delay=None, consumed=True) for d in list(self._handed.values())]
        while self._buffer:
            message = self._buffer.popleft()
            if message.channel is underlay:
                returns.append(self._return(self._delivery(message), requeue=True, delay=None, consumed=False))
        if returns:
            await asyncio.gather(*returns, return_exceptions=True)
        await self._acks.drain()
