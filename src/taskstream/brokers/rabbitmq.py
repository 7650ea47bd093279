"""RabbitMQ backend on aio-pika: robust connection, pipelined publisher confirms, manual acks.

URL: ``amqp://user:password@host:5672/vhost?options`` (``amqps://`` for TLS; aio-pika's own options such as
``heartbeat``, ``name``, ``reconnect_interval`` or the TLS file options pass through). taskstream's options:

=======================  =====================================================================  ===============
Option                   Meaning                                                                Default
=======================  =====================================================================  ===============
``queue_type``           ``classic`` or ``quorum`` for every queue this broker declares         ``classic``
``max_message_bytes``    largest body published; keep it at or below the server's               134217728
                         ``max_message_size`` (128 MiB on RabbitMQ 3.10)
``persistent``           ``delivery_mode=2`` on every message                                   ``true``
``durable``              durable queues (taskstream's own exchanges and delay queues always     ``true``
                         are)
``publish_timeout``      seconds a publish may wait for its confirm, reconnects included        ``30``
``connect_timeout``      seconds the first connect may take                                     ``10``
``reconnect_timeout``    seconds without a connection before subscriptions raise                ``300``
                         ``BrokerConnectionError`` (the connection is gone for good)
``reconnect_interval``   seconds between reconnect attempts (aio-pika's option)                 ``1``
``topic_exchange``       topic exchange of ``publish_topic``                                    ``taskstream.topics``
=======================  =====================================================================  ===============

How the Broker protocol maps onto AMQP:

================  =========================================================================================
Operation         How it works here
================  =========================================================================================
publish           ``basic.publish`` to the default exchange, ``mandatory`` (an unroutable message raises
                  :class:`QueueNotFound`), awaited publisher confirm; many confirms in flight at once
                  (``publish_batch`` and concurrent ``publish`` calls pipeline on one channel; at most two
                  batches per broker at a time, which keeps aiormq's channel lock cheap)
consume           one channel per subscription, ``basic.qos(prefetch)``, ``basic.consume`` with manual acks
ack               ``basic.ack``; acks settled in the same loop turn go out as one ``multiple=True`` ack for
                  the contiguous run of delivery tags (the rest one by one). ``ack()`` returns once the frame
                  is handed to the connection; AMQP never confirms acks, so a connection lost just then
                  means a redelivery. An ack or nack of a delivery whose channel is already gone is logged
                  and ignored: the broker has requeued that message itself.
nack(requeue)     republish a copy with ``x-ts-attempt`` = attempts so far (confirmed), then ack the
                  original: the copy joins the tail of the queue. ``Subscription.close()`` returns what it
                  holds the same way (deliveries handed out count as an attempt, prefetched ones do not)
nack(delay=d)     the same copy goes through a delay queue ``taskstream.delay.<ms>`` (queue TTL ``d``,
                  dead-letter exchange ``""``): it expires back onto the original queue after ``d`` s. One
                  delay queue per delay bucket (100 ms steps up to 10 s, 1 s up to 100 s, 10 s beyond) so
                  every message in a bucket has the same TTL and none waits behind a longer one.
                  Buckets are reached through the headers exchange ``taskstream.delay``; unused ones expire.
nack(no requeue)  ``basic.reject(requeue=False)``: the queue's dead-letter exchange ``taskstream.dlx`` routes
                  it to the queue named by ``declare(dead_letter=...)`` with RabbitMQ's ``x-death`` reason
dead-letter       done by the consumer runtime (``<queue>.dlq``, ``x-death-reason`` headers); broker-side
                  rejects land in the same queue through ``taskstream.dlx``
visibility        none: RabbitMQ holds an unacked message until ack or until the channel/connection
                  closes, then redelivers it (``extend`` is a no-op). The server's ``consumer_timeout``
                  (30 min by default) still closes a channel that holds one message longer than that.
attempt           ``x-ts-attempt`` header (attempts already made, carried by requeued copies) + 1, plus
                  the deliveries the broker itself retried: quorum queues count them exactly
                  (``x-delivery-count``); classic queues only say ``redelivered``, counted as one
topics            topic exchange ``taskstream.topics``; ``declare(q, topics=["a.#"])`` binds ``q`` with
                  the pattern (AMQP syntax: ``#`` many words, ``*`` one word)
size limit        ``max_message_bytes``; over it ``MessageTooLarge`` before sending. AMQP does not tell a
                  client the server's ``max_message_size``: the server's own refusal ("larger than configured
                  max size") is mapped to ``MessageTooLarge`` naming the server's limit, which the broker
                  then adopts as its ``capabilities.max_message_bytes``
reconnect         aio-pika's robust connection reconnects; channels reopen, QoS is restored, queues,
                  bindings and consumers are declared again. Publishes wait for the connection (up to
                  ``publish_timeout``, then ``PublishError``) and are sent again when their confirm was lost
                  (at-least-once: a message may arrive twice, with the same ``message_id``). Waits on a
                  channel that dies are interrupted (a dead connection never drains its write queue).
                  After ``reconnect_timeout`` without a connection, subscriptions raise
                  ``BrokerConnectionError`` and the consumer runtime stops loudly.
================  =========================================================================================

Properties: ``message_id``, ``correlation_id``, ``reply_to`` and ``content_type`` are native AMQP properties
(the reserved header names map onto them and back), the rest travels in ``headers`` (floats as 64-bit doubles;
received values come back JSON-compatible: timestamps as epoch seconds, bytes as text); ``key`` travels in the
``x-ts-key`` header. A plain AMQP client can publish JSON to a declared queue and a taskstream consumer reads it.
Queues are declared with ``x-dead-letter-exchange``/``x-dead-letter-routing-key`` (and ``x-queue-type``); a queue
that already exists with other arguments (declared by another system) is used as it is, with a warning.

Channels: one for publishing (confirm mode), one per subscription (its own QoS), one for declarations and
queue management (a refused declaration closes only that one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import decimal
import itertools
import logging
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp import encode as pamqp_encode
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskstream.brokers.base import Broker, Capabilities, Delivery, OutgoingMessage, Subscription
from taskstream.errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MessageTooLarge,
    PublishError,
    QueueNotFound,
)
from taskstream.messages import new_id
from taskstream.settings import redact_url

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_TOPIC_EXCHANGE",
    "DELAY_EXCHANGE",
    "DLX_EXCHANGE",
    "RabbitMQBroker",
    "RabbitMQConfig",
]

log = logging.getLogger("taskstream.brokers.rabbitmq")

DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
DEFAULT_PUBLISH_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RECONNECT_TIMEOUT = 300.0
DEFAULT_RECONNECT_INTERVAL = 1.0
DEFAULT_TOPIC_EXCHANGE = "taskstream.topics"
DELAY_EXCHANGE = "taskstream.delay"
DELAY_QUEUE_PREFIX = "taskstream.delay."
DLX_EXCHANGE = "taskstream.dlx"
MAX_DELAY = 24 * 3600.0

ATTEMPT_HEADER = "x-ts-attempt"
KEY_HEADER = "x-ts-key"
DELAY_HEADER = "ts-delay-ms"  # headers exchanges ignore names starting with "x-"
# Set by the server; never copied onto a message we publish.
_SERVER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        ATTEMPT_HEADER,
        DELAY_HEADER,
    }
)
_NATIVE = ("content_type", "correlation_id", "reply_to")
_DELAY_MARGIN_MS = 3_600_000  # a delay queue outlives its TTL by an hour after its last use
_SIZE_REFUSED = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


class RabbitMQConfig(BaseModel):
    """Options of one RabbitMQ broker (the URL's query string, or keyword options of ``from_url``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_type: Literal["classic", "quorum"] = "classic"
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    persistent: bool = True
    durable: bool = True
    publish_timeout: float = Field(DEFAULT_PUBLISH_TIMEOUT, gt=0)
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    reconnect_timeout: float = Field(DEFAULT_RECONNECT_TIMEOUT, gt=0)
    reconnect_interval: float = Field(DEFAULT_RECONNECT_INTERVAL, gt=0)
    topic_exchange: str = DEFAULT_TOPIC_EXCHANGE


_OWN_OPTIONS = frozenset(RabbitMQConfig.model_fields)


def _delay_bucket_ms(delay: float) -> int:
    """Round ``delay`` seconds to its bucket in milliseconds (100 ms / 1 s / 10 s steps)."""
    ms = delay * 1000.0
    step = 100 if ms <= 10_000 else 1000 if ms <= 100_000 else 10_000
    return max(step, round(ms / step) * step)


def _json_value(value: Any) -> Any:
    """A header value as JSON-compatible data (AMQP tables may carry bytes, timestamps, decimals)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _tag(message: DeliveredMessage) -> int:
    return int(message.delivery.delivery_tag or 0)  # type: ignore[union-attr]


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _map_error(exc: BaseException, what: str) -> BrokerError:
    """One AMQP/driver error as a taskstream error (the caller chains it with ``from exc``)."""
    text = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, amqp_errors.ChannelNotFoundEntity):
        return QueueNotFound(text)
    if isinstance(exc, amqp_errors.DeliveryError):
        return PublishError(text)
    if isinstance(
        exc,
        amqp_errors.AMQPConnectionError
        | amqp_errors.ChannelInvalidStateError
        | ConnectionError
        | OSError
        | asyncio.TimeoutError,
    ):
        return BrokerConnectionError(text)
    return BrokerError(text)


_RETRYABLE = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    RuntimeError,
)


class _ChannelGuard:
    """Interrupts the tasks waiting on an AMQP channel when that channel closes or their deadline passes.

    A connection that dies never drains its write queue, so a publish or ack blocked on it (or awaiting a
    confirm the broker will never send) would wait forever; the guard cancels such waits and :meth:`wait`
    turns them into ``ChannelInvalidStateError`` (retried or reported by the caller) or ``TimeoutError``.
    One sweeper timer checks deadlines about once a second, so a wait costs no timer of its own.
    """

    SWEEP_INTERVAL = 0.5

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Task[Any], tuple[aiormq.abc.AbstractChannel, float | None]] = {}
        self._interrupted: dict[asyncio.Task[Any], type[Exception]] = {}
        self._watched: set[int] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def wait(self, channel: aiormq.abc.AbstractChannel, operation: Any, deadline: float | None = None) -> Any:
        """Await ``operation`` (a coroutine using ``channel``) unless the channel closes or ``deadline`` passes."""
        task = asyncio.current_task()
        assert task is not None
        if id(channel) not in self._watched:
            self._watched.add(id(channel))
            channel.closing.add_done_callback(lambda _: self._closed(channel))
        if channel.is_closed:
            operation.close()
            raise amqp_errors.ChannelInvalidStateError("channel closed")
        self._waiting[task] = (channel, deadline)
        if deadline is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.SWEEP_INTERVAL, self._sweep)
        try:
            return await operation
        except asyncio.CancelledError:
            reason = self._interrupted.pop(task, None)
            if reason is not None:
                task.uncancel()
                raise reason("channel closed while waiting on it") from None
            raise
        finally:
            self._waiting.pop(task, None)

    def _interrupt(self, task: asyncio.Task[Any], reason: type[Exception]) -> None:
        if not task.done() and task not in self._interrupted:
            self._interrupted[task] = reason
            task.cancel()

    def _closed(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._watched.discard(id(channel))
        for task, (waiting_on, _) in list(self._waiting.items()):
            if waiting_on is channel:
                self._interrupt(task, amqp_errors.ChannelInvalidStateError)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = False
        for task, (_, deadline) in list(self._waiting.items()):
            if deadline is None:
                continue
            if now >= deadline:
                self._interrupt(task, TimeoutError)
            else:
                pending = True
        if pending:
            self._sweeper = loop.call_later(self.SWEEP_INTERVAL, self._sweep)

    def cancel(self) -> None:
        """Stop the sweeper (the broker is closing)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def _encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table with floats as 64-bit doubles (pamqp would send 32-bit floats and lose precision)."""
    parts = []
    for key, value in sorted(table.items()):
        parts.append(pamqp_encode.short_string(key))
        parts.append(_encode_field(value))
    data = b"".join(parts)
    return struct.pack(">I", len(data)) + data


def _encode_field(value: Any) -> bytes:
    if isinstance(value, float):
        return b"d" + pamqp_encode.double(value)
    if isinstance(value, dict):
        return b"F" + _encode_table(value)
    if isinstance(value, list | tuple):
        data = b"".join(_encode_field(v) for v in value)
        return b"A" + struct.pack(">I", len(data)) + data
    return pamqp_encode.encode_table_value(value)


class _Properties(spec.Basic.Properties):
    """``Basic.Properties`` whose headers table keeps float values exact (encoded as doubles)."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers" and value:
            return _encode_table(value)
        return super().encode_property(name, value)


@dataclass(slots=True)
class _Declared:
    """What ``declare`` did for one queue, replayed after a reconnect."""

    arguments: dict[str, Any] | None
    bindings: set[tuple[str, str]] = field(default_factory=set)
    dead_letter: str | None = None


class _RabbitDelivery(Delivery):
    __slots__ = ("_channel", "_message", "_prior", "_sub", "_tag")

    def __init__(
        self,
        sub: _RabbitSubscription,
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
        self._tag = _tag(message)
        self._prior = prior

    async def _ack(self) -> None:
        written = self._sub._ack(self._channel, self._tag)
        if written is not None:
            await asyncio.shield(written)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        await self._sub._return(self, requeue=requeue, delay=delay, consumed=True)


class _RabbitSubscription(Subscription):
    """A consumer on its own channel. Deliveries wait in ``_buffer`` until ``__anext__`` hands them out."""

    _tags = itertools.count(1)

    def __init__(self, broker: RabbitMQBroker, queue: str, prefetch: int) -> None:
        if not 1 <= prefetch <= 65535:
            raise ConfigurationError(f"prefetch must be between 1 and 65535 on RabbitMQ, got {prefetch}")
        self.broker = broker
        self.queue = queue
        self.prefetch = prefetch
        self._consumer_tag = f"taskstream.{queue}.{next(self._tags)}.{new_id()[:8]}"
        self._channel: AbstractRobustChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._buffer: collections.deque[DeliveredMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BrokerError | None = None
        # delivery tags of the current channel not yet acked on the wire, in delivery order
        self._outstanding: collections.deque[int] = collections.deque()
        self._handed: dict[int, _RabbitDelivery] = {}
        self._to_ack: set[int] = set()
        self._gone: set[int] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_done: asyncio.Future[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def _start(self) -> None:
        """Open the channel and start consuming; while the connection is down, wait for it (bounded)."""
        broker = self.broker
        loop = asyncio.get_running_loop()
        deadline = loop.time() + broker.config.reconnect_timeout
        while True:
            connection = await broker._connection_ready()
            channel = connection.channel(publisher_confirms=False)
            try:
                await channel.initialize()
                await channel.set_qos(prefetch_count=self.prefetch)
                self._channel = channel
                await self._consume(await channel.get_underlay_channel())
                break
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            except Exception as exc:
                self._channel = None
                with contextlib.suppress(Exception):
                    await channel.close()
                if isinstance(exc, amqp_errors.AMQPChannelError) or loop.time() >= deadline:
                    raise _map_error(exc, f"cannot consume RabbitMQ queue {self.queue!r}") from exc
                log.info("cannot consume RabbitMQ queue %r yet (%s); retrying", self.queue, exc)
                await asyncio.sleep(0.5)
        channel.reopen_callbacks.add(self._on_reopen)
        broker._subscriptions.add(self)

    async def _consume(self, underlay: aiormq.abc.AbstractChannel) -> None:
        self._underlay = underlay
        self._outstanding.clear()
        self._to_ack.clear()
        self._gone.clear()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        await underlay.basic_consume(self.queue, self._on_message, consumer_tag=self._consumer_tag)

    async def _on_reopen(self, channel: Any) -> None:
        if self._closed or self._channel is None:
            return
        try:
            await self.broker._redeclare(self.queue)
            await self._consume(await self._channel.get_underlay_channel())
            log.info("consumer on RabbitMQ queue %r resumed after a reconnect", self.queue)
        except Exception as exc:
            self._fail(_map_error(exc, f"cannot resume consuming RabbitMQ queue {self.queue!r}"))

    def _on_cancelled(self, frame: Any) -> None:
        if getattr(frame, "consumer_tag", None) == self._consumer_tag and not self._closed:
            self._fail(QueueNotFound(f"RabbitMQ cancelled the consumer on {self.queue!r} (was the queue deleted?)"))

    def _fail(self, error: BrokerError) -> None:
        self._failure = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _on_message(self, message: DeliveredMessage) -> None:
        if message.channel is not self._underlay:
            return  # a late delivery of a channel that is gone: the broker requeued it
        self._outstanding.append(_tag(message))
        self._buffer.append(message)
        self._wake()

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
            if self.broker._gone is not None:
                raise self.broker._gone
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _delivery(self, message: DeliveredMessage) -> _RabbitDelivery:
        props = message.header.properties
        raw = props.headers
        headers: dict[str, Any] = {}
        given = 0
        prior = 0
        key = None
        if raw:
            for name, value in raw.items():
                if name == ATTEMPT_HEADER:
                    given = _as_int(value)
                elif name == KEY_HEADER:
                    key = _json_value(value)
                elif name == "x-delivery-count":
                    prior = _as_int(value)
                elif name == DELAY_HEADER:
                    continue
                elif isinstance(value, str | int | float | bool):
                    headers[name] = value
                else:
                    headers[name] = _json_value(value)
        if not prior and message.delivery.redelivered:  # type: ignore[union-attr]
            prior = 1
        if props.content_type is not None:
            headers["content_type"] = props.content_type
        if props.correlation_id is not None:
            headers["correlation_id"] = props.correlation_id
        if props.reply_to is not None:
            headers["reply_to"] = props.reply_to
        delivery = _RabbitDelivery(
            self,
            message,
            headers,
            attempt=given + prior + 1,
            prior=given + prior,
            message_id=props.message_id or new_id(),
            key=key,
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
        self._to_ack.add(tag)
        written = self._flush_done
        if written is None:
            loop = asyncio.get_running_loop()
            written = self._flush_done = loop.create_future()
            self._flush_task = loop.create_task(self._flush(written))
        return written

    async def _flush(self, written: asyncio.Future[None]) -> None:
        """Send the acks settled during this loop turn: one ``multiple`` ack for the contiguous prefix."""
        try:
            await asyncio.sleep(0)
            while self._to_ack:
                channel = self._underlay
                to_ack, self._to_ack = self._to_ack, set()
                if channel is None or channel.is_closed:
                    return
                outstanding, gone = self._outstanding, self._gone
                top = 0
                while outstanding:
                    head = outstanding[0]
                    if head in to_ack:
                        top = head
                        to_ack.discard(head)
                    elif head in gone:
                        gone.discard(head)
                    else:
                        break
                    outstanding.popleft()
                guard = self.broker._guard
                if top:
                    await guard.wait(channel, channel.basic_ack(top, multiple=True, wait=False))
                for tag in sorted(to_ack):
                    # acked out of order: the head is still held; ack alone, remember it is gone
                    await guard.wait(channel, channel.basic_ack(tag, wait=False))
                    self._gone.add(tag)
        except Exception as exc:  # the channel died: the broker redelivers what we could not ack
            log.warning("acks on RabbitMQ queue %r were lost (%s); the broker redelivers", self.queue, exc)
        finally:
            self._flush_task = None
            self._flush_done = None
            if not written.done():
                written.set_result(None)

    async def _return(self, delivery: _RabbitDelivery, *, requeue: bool, delay: float | None, consumed: bool) -> None:
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
            guard = self.broker._guard
            if how == "reject":
                await guard.wait(channel, channel.basic_reject(tag, requeue=False, wait=False))
            else:
                await guard.wait(channel, channel.basic_nack(tag, requeue=True, wait=False))
        except Exception as exc:
            log.warning("%s on RabbitMQ queue %r was lost (%s); the broker redelivers", how, self.queue, exc)
            return
        self._gone.add(tag)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        start = self._start_task
        if start is not None and not start.done():
            start.cancel()
            with contextlib.suppress(BaseException):
                await start
        channel = self._channel
        underlay = self._underlay
        try:
            if underlay is not None and not underlay.is_closed:
                with contextlib.suppress(Exception):
                    await self.broker._guard.wait(underlay, underlay.basic_cancel(self._consumer_tag))
                await asyncio.sleep(0)  # deliveries that arrived before the cancel reach the buffer
                # return what we hold: handed-out unsettled ones count as an attempt, buffered ones do not
                returns = [
                    self._return(d, requeue=True, delay=None, consumed=True) for d in list(self._handed.values())
                ]
                while self._buffer:
                    message = self._buffer.popleft()
                    if message.channel is underlay:
                        returns.append(self._return(self._delivery(message), requeue=True, delay=None, consumed=False))
                if returns:
                    await asyncio.gather(*returns, return_exceptions=True)
                if self._flush_task is not None:
                    await asyncio.gather(self._flush_task, return_exceptions=True)
        finally:
            self._buffer.clear()
            self._handed.clear()
            self.broker._subscriptions.discard(self)
            if channel is not None:
                channel.reopen_callbacks.discard(self._on_reopen)
                with contextlib.suppress(Exception):
                    await channel.close()


class RabbitMQBroker(Broker):
    """A RabbitMQ broker reached over one robust AMQP connection. See the module docstring for the mapping.

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
            native_dead_letter=False,
            native_delay=True,
            visibility_timeout=None,
            max_batch=1000,
            max_delay=MAX_DELAY,
        )
        self._delivery_mode = 2 if self.config.persistent else 1
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._pub_underlay: aiormq.abc.AbstractChannel | None = None
        self._admin: aiormq.abc.AbstractChannel | None = None
        self._admin_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._declared: dict[str, _Declared] = {}
        self._seen: set[str] = set()  # queues known to exist (declared elsewhere)
        self._exchanges: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._delay_declared: dict[int, float] = {}
        self._subscriptions: set[_RabbitSubscription] = set()
        self._gone: BrokerConnectionError | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self._guard = _ChannelGuard()
        self._batch_slots = asyncio.Semaphore(2)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQBroker:
        """Build from ``amqp://user:pass@host:port/vhost?options``; ``options`` override the query string."""
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"not an AMQP URL: {redact_url(url)!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        own: dict[str, Any] = {k: v for k, v in query if k in _OWN_OPTIONS}
        passthrough = [(k, v) for k, v in query if k not in _OWN_OPTIONS]
        own.update(options)
        try:
            config = RabbitMQConfig.model_validate(own)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"bad RabbitMQ URL {redact_url(url)!r}: {problems}") from None
        if not any(k == "reconnect_interval" for k, _ in passthrough):
            passthrough.append(("reconnect_interval", str(config.reconnect_interval)))
        driver_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(passthrough), ""))
        return cls(driver_url, config)

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {redact_url(self._url)} queue_type={self.config.queue_type}>"

    # -- connection -----------------------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connection is not None:
                return
            self._closed = False
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    connection = await aio_pika.connect_robust(self._url)
            except TimeoutError as exc:
                raise BrokerConnectionError(
                    f"cannot connect to RabbitMQ at {redact_url(self._url)} within {self.config.connect_timeout} s"
                ) from exc
            except Exception as exc:
                raise BrokerConnectionError(
                    f"cannot connect to RabbitMQ at {redact_url(self._url)}: {type(exc).__name__}: {exc}"
                ) from exc
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            try:
                publisher = connection.channel(publisher_confirms=True)
                await publisher.initialize()
                self._pub_underlay = await publisher.get_underlay_channel()
            except Exception as exc:
                await connection.close()
                raise _map_error(exc, "cannot open a RabbitMQ channel") from exc
            self._connection = connection
            self._publisher = publisher
            self._gone = None

    async def close(self) -> None:
        self._closed = True
        for subscription in list(self._subscriptions):
            with contextlib.suppress(Exception):
                await subscription.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._guard.cancel()
        connection, self._connection = self._connection, None
        self._publisher = self._pub_underlay = self._admin = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def _on_connection_lost(self, connection: Any, exc: BaseException | None) -> None:
        if self._closed or self._watchdog is not None:
            return
        log.warning("RabbitMQ connection to %s lost (%s); reconnecting", redact_url(self._url), exc)
        self._watchdog = asyncio.get_running_loop().create_task(self._give_up_later())

    async def _give_up_later(self) -> None:
        await asyncio.sleep(self.config.reconnect_timeout)
        self._gone = BrokerConnectionError(
            f"RabbitMQ at {redact_url(self._url)} unreachable for {self.config.reconnect_timeout} s; giving up"
        )
        log.error("%s", self._gone)
        for subscription in list(self._subscriptions):
            subscription._wake()

    async def _on_reconnected(self, connection: Any) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._gone = None
        log.info("RabbitMQ connection to %s restored", redact_url(self._url))
        for name in list(self._exchanges):
            with contextlib.suppress(Exception):
                await self._declare_exchange(name, force=True)
        for queue in list(self._declared):
            try:
                await self._redeclare(queue)
            except Exception as exc:
                log.warning("could not declare RabbitMQ queue %r again after reconnect: %s", queue, exc)

    async def _connection_ready(self) -> AbstractRobustConnection:
        if self._connection is None:
            if self._closed:
                raise BrokerConnectionError("the RabbitMQ broker is closed")
            await self.connect()
        assert self._connection is not None
        if self._gone is not None:
            raise self._gone
        return self._connection

    async def _publish_channel(self) -> aiormq.abc.AbstractChannel:
        underlay = self._pub_underlay
        if underlay is not None and not underlay.is_closed:
            return underlay
        await self._connection_ready()
        publisher = self._publisher
        if publisher is None:
            raise BrokerConnectionError("the RabbitMQ broker is closed")
        while True:
            await publisher.ready()
            underlay = await publisher.get_underlay_channel()
            if not underlay.is_closed:
                self._pub_underlay = underlay
                return underlay
            await asyncio.sleep(0.05)

    async def _admin_channel(self) -> aiormq.abc.AbstractChannel:
        admin = self._admin
        if admin is not None and not admin.is_closed:
            return admin
        async with self._admin_lock:
            admin = self._admin
            if admin is not None and not admin.is_closed:
                return admin
            connection = await self._connection_ready()
            await connection.ready()
            transport = connection.transport
            if transport is None:
                raise BrokerConnectionError("RabbitMQ connection is not ready")
            self._admin = await transport.connection.channel(publisher_confirms=False)
            return self._admin

    async def _admin_call(self, what: str, op: Any) -> Any:
        """Run ``op(channel)`` on the admin channel, mapping errors; a refused op reopens the channel."""
        try:
            async with asyncio.timeout(self.config.publish_timeout):
                channel = await self._admin_channel()
                return await op(channel)
        except BrokerError:
            raise
        except TimeoutError as exc:
            raise BrokerConnectionError(
                f"{what}: no answer from RabbitMQ within {self.config.publish_timeout} s"
            ) from exc
        except Exception as exc:
            raise _map_error(exc, what) from exc

    # -- declarations ---------------------------------------------------------------------------------

    def _queue_arguments(self, queue: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-dead-letter-exchange": DLX_EXCHANGE, "x-dead-letter-routing-key": queue}
        if self.config.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        return arguments

    async def _declare_exchange(self, name: str, kind: str = "direct", *, force: bool = False) -> None:
        if name in self._exchanges and not force:
            return
        kind = self._exchanges.get(name, (kind, None))[0]
        await self._admin_call(
            f"cannot declare RabbitMQ exchange {name!r}",
            # shared by every process on the server: always durable, so any two configurations agree
            lambda ch: ch.exchange_declare(name, exchange_type=kind, durable=True),
        )
        self._exchanges[name] = (kind, None)

    async def _declare_queue(self, queue: str, arguments: dict[str, Any] | None) -> dict[str, Any] | None:
        """Declare ``queue``; an existing queue with other arguments is used as it is (with a warning)."""
        durable = self.config.durable or self.config.queue_type == "quorum"
        try:
            await self._admin_call(
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
        await self._admin_call(f"cannot use RabbitMQ queue {queue!r}", lambda ch: ch.queue_declare(queue, passive=True))
        return None

    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        if not queue or len(queue.encode()) > 255:
            raise ConfigurationError(f"RabbitMQ queue names are 1-255 bytes, got {queue!r}")
        entry = self._declared.get(queue)
        if entry is None:
            arguments = await self._declare_queue(queue, self._queue_arguments(queue))
            entry = self._declared[queue] = _Declared(arguments)
        if dead_letter and entry.dead_letter != dead_letter:
            await self.declare(dead_letter)
            await self._declare_exchange(DLX_EXCHANGE)
            await self._bind(dead_letter, DLX_EXCHANGE, queue)
            entry.dead_letter = dead_letter
        if topics:
            await self._declare_exchange(self.config.topic_exchange, "topic")
            for pattern in topics:
                await self._bind(queue, self.config.topic_exchange, pattern)
                entry.bindings.add((self.config.topic_exchange, pattern))

    async def _bind(self, queue: str, exchange: str, key: str) -> None:
        await self._admin_call(
            f"cannot bind RabbitMQ queue {queue!r} to {exchange!r}",
            lambda ch: ch.queue_bind(queue, exchange, routing_key=key),
        )
        if exchange == DLX_EXCHANGE:
            return
        entry = self._declared.get(queue)
        if entry is not None:
            entry.bindings.add((exchange, key))

    async def _redeclare(self, queue: str) -> None:
        entry = self._declared.get(queue)
        if entry is None:
            return
        await self._declare_queue(queue, entry.arguments)
        for exchange, key in list(entry.bindings):
            await self._declare_exchange(exchange)
            await self._admin_call(
                f"cannot bind RabbitMQ queue {queue!r}", lambda ch, e=exchange, k=key: ch.queue_bind(queue, e, k)
            )
        dead_letter = entry.dead_letter
        if dead_letter:
            await self._declare_exchange(DLX_EXCHANGE)
            target = self._declared.get(dead_letter)
            if target is not None:
                await self._declare_queue(dead_letter, target.arguments)
            await self._admin_call(
                f"cannot bind RabbitMQ queue {dead_letter!r}",
                lambda ch: ch.queue_bind(dead_letter, DLX_EXCHANGE, queue),
            )

    async def _delay_route(self, delay: float) -> int:
        """Make sure the delay queue of ``delay``'s bucket exists; returns the bucket in ms."""
        if delay > MAX_DELAY:
            raise ConfigurationError(f"delay of {delay} s is over the RabbitMQ backend's limit of {MAX_DELAY} s")
        ms = _delay_bucket_ms(delay)
        declared = self._delay_declared.get(ms)
        now = time.monotonic()
        if declared is not None and now - declared < _DELAY_MARGIN_MS / 2000:
            return ms
        await self._declare_exchange(DELAY_EXCHANGE, "headers")
        name = f"{DELAY_QUEUE_PREFIX}{ms}"
        await self._admin_call(
            f"cannot declare RabbitMQ delay queue {name!r}",
            lambda ch: ch.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-message-ttl": ms,
                    "x-dead-letter-exchange": "",
                    "x-expires": ms + _DELAY_MARGIN_MS,
                },
            ),
        )
        await self._admin_call(
            f"cannot bind RabbitMQ delay queue {name!r}",
            lambda ch: ch.queue_bind(name, DELAY_EXCHANGE, "", arguments={"x-match": "all", DELAY_HEADER: ms}),
        )
        self._delay_declared[ms] = now
        return ms

    # -- publishing -----------------------------------------------------------------------------------

    def _properties(
        self,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        key: str | None,
    ) -> spec.Basic.Properties:
        table: dict[str, Any] = {}
        natives: dict[str, str] = {}
        if headers:
            for name, value in headers.items():
                if name in _SERVER_HEADERS:
                    continue
                if name in _NATIVE and isinstance(value, str) and len(value) <= 255:
                    natives[name] = value
                else:
                    table[name] = value
        if key is not None:
            table[KEY_HEADER] = key
        return _Properties(
            headers=table or None,
            delivery_mode=self._delivery_mode,
            message_id=message_id or new_id(),
            content_type=natives.get("content_type"),
            correlation_id=natives.get("correlation_id"),
            reply_to=natives.get("reply_to"),
        )

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.capabilities.max_message_bytes:
            raise MessageTooLarge(len(body), self.capabilities.max_message_bytes, "rabbitmq")

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
            try:
                channel = self._pub_underlay
                if channel is None or channel.is_closed:
                    async with asyncio.timeout_at(deadline):
                        channel = await self._publish_channel()
                result = await self._guard.wait(
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
                refused = _SIZE_REFUSED.search(str(exc))
                if refused and int(refused.group(1)) == len(body):
                    limit = int(refused.group(2))
                    if limit < self.capabilities.max_message_bytes:  # learn the server's limit
                        log.warning(
                            "RabbitMQ's max_message_size is %d bytes, below max_message_bytes=%d: using %d",
                            limit,
                            self.capabilities.max_message_bytes,
                            limit,
                        )
                        self.capabilities = dataclasses.replace(self.capabilities, max_message_bytes=limit)
                    raise MessageTooLarge(len(body), limit, "rabbitmq server") from exc
                if loop.time() >= deadline:
                    raise _map_error(exc, f"RabbitMQ refused a publish to {routing_key!r}") from exc
                continue  # another publish broke the channel; it reopens
            except amqp_errors.DeliveryError as exc:
                raise PublishError(f"RabbitMQ refused (nacked) a message for {routing_key!r}") from exc
            except _RETRYABLE as exc:
                if self._closed:
                    raise BrokerConnectionError("the RabbitMQ broker was closed during a publish") from exc
                if loop.time() >= deadline:
                    raise _map_error(exc, f"cannot publish to RabbitMQ {routing_key!r}") from exc
                await asyncio.sleep(0.05)
                continue
            except amqp_errors.AMQPError as exc:
                raise _map_error(exc, f"cannot publish to RabbitMQ {routing_key!r}") from exc
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
        properties = self._properties(headers, message_id, key)
        if delay is not None and delay > 0:
            await self._send_delayed(queue, body, properties, delay)
        else:
            await self._send("", queue, body, properties, mandatory=True)

    async def _send_delayed(self, queue: str, body: bytes, properties: spec.Basic.Properties, delay: float) -> None:
        if queue not in self._declared and queue not in self._seen:
            # the delay queue would accept it and drop it later as unroutable: check the target exists now
            await self.depth(queue)
            self._seen.add(queue)
        ms = await self._delay_route(delay)
        table = dict(properties.headers or {})
        table[DELAY_HEADER] = ms
        properties.headers = table
        try:
            await self._send(DELAY_EXCHANGE, queue, body, properties, mandatory=True)
        except QueueNotFound:  # the delay queue expired since we declared it: declare again, once
            self._delay_declared.pop(ms, None)
            await self._delay_route(delay)
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
        sends = []
        for message in messages:
            properties = self._properties(message.headers, message.message_id, message.key)
            if message.delay is not None and message.delay > 0:
                sends.append(self._send_delayed(queue, message.body, properties, message.delay))
            else:
                sends.append(self._send("", queue, message.body, properties, mandatory=True))
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def publish_topic(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        self._check_size(body)
        await self._declare_exchange(self.config.topic_exchange, "topic")
        properties = self._properties({**(headers or {}), "topic": topic}, message_id, None)
        await self._send(self.config.topic_exchange, topic, body, properties, mandatory=False)

    async def _republish(self, message: DeliveredMessage, queue: str, attempts: int, delay: float | None) -> None:
        """Publish a copy of a received message back onto ``queue`` carrying ``attempts``."""
        old = message.header.properties
        table = {k: v for k, v in (old.headers or {}).items() if k not in _SERVER_HEADERS}
        table[ATTEMPT_HEADER] = attempts
        properties = _Properties(
            content_type=old.content_type,
            content_encoding=old.content_encoding,
            headers=table,
            delivery_mode=old.delivery_mode or self._delivery_mode,
            priority=old.priority,
            correlation_id=old.correlation_id,
            reply_to=old.reply_to,
            message_id=old.message_id or new_id(),
            timestamp=old.timestamp,
            message_type=old.message_type,
            app_id=old.app_id,
        )
        if delay is not None and delay > 0:
            await self._send_delayed(queue, message.body, properties, delay)
        else:
            await self._send("", queue, message.body, properties, mandatory=True)

    # -- consuming and queue management ---------------------------------------------------------------

    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        """A subscription on ``queue``; it opens its channel on the first ``__anext__``."""
        return _RabbitSubscription(self, queue, prefetch)

    async def purge(self, queue: str) -> None:
        await self._admin_call(f"cannot purge RabbitMQ queue {queue!r}", lambda ch: ch.queue_purge(queue))

    async def depth(self, queue: str) -> int:
        result = await self._admin_call(
            f"cannot read the depth of RabbitMQ queue {queue!r}", lambda ch: ch.queue_declare(queue, passive=True)
        )
        return int(result.message_count or 0)

    async def delete_queue(self, queue: str) -> None:
        self._declared.pop(queue, None)
        self._seen.discard(queue)
        await self._admin_call(
            f"cannot delete RabbitMQ queue {queue!r}",
            lambda ch: ch.queue_delete(queue, if_unused=False, if_empty=False),
        )
