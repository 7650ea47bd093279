"""Publishing envelopes: encoding, size checks, batching and backpressure, written once for every broker.

Broker headers set on every message (backends with native properties, like AMQP, map the reserved names
``content_type``, ``correlation_id`` and ``reply_to`` onto them):

* ``content_type``: ``application/vnd.taskstream+json``
* ``ts_kind``: the envelope kind (``task``, ``result``, ``record``, ``control``)
* ``correlation_id`` / ``reply_to``: when the envelope has them

Backpressure: at most ``max_in_flight`` publishes wait on the broker at once; further callers wait for a
slot, so a slow broker slows its producers and memory stays bounded.

Large payloads (claim-check, :mod:`taskstream.payloads`): an encoded envelope over ``inline_limit``
(the broker's ``max_message_bytes`` minus headroom, or ``TASKSTREAM_PAYLOAD_THRESHOLD``) is stored in the
payload store and the message carries a reference instead; consumers resolve it before the handler runs.
Topic publishes mark the reference ``shared`` (several queues read one blob; expiry removes it).

Observability (:mod:`taskstream.observe`): every publish here counts into the metrics of the broker's recorder
(messages published, publish-to-confirm time, errors) and, with a tracer configured, carries a ``publish`` span's
``traceparent`` in its headers. Both are no-ops otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from taskstream.brokers.base import Broker, OutgoingMessage
from taskstream.errors import MessageError, MessageTooLarge, NotSupported, QueueNotFound
from taskstream.messages import CONTENT_TYPE, Envelope, encode
from taskstream.observe.metrics import recorder_for
from taskstream.observe.tracing import tracing_for
from taskstream.payloads.claimcheck import ClaimCheck, PayloadRef

# Publish errors after which the broker surely does not hold the message, so its offloaded payload can go.
_REJECTED = (MessageError, NotSupported, QueueNotFound)

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "Producer", "broker_headers"]

DEFAULT_MAX_IN_FLIGHT = 1000


def broker_headers(envelope: Envelope) -> dict[str, Any]:
    """The broker-level headers that describe ``envelope`` to plain clients."""
    headers: dict[str, Any] = {"content_type": CONTENT_TYPE, "ts_kind": envelope.kind}
    if envelope.correlation_id:
        headers["correlation_id"] = envelope.correlation_id
    if envelope.reply_to:
        headers["reply_to"] = envelope.reply_to
    return headers


class Producer:
    """Encodes envelopes and publishes them with bounded concurrency.

    Example:
        >>> async def example(broker):
        ...     producer = Producer(broker)
        ...     await producer.send("readings", Envelope(body={"t": 21.5}))
    """

    def __init__(
        self,
        broker: Broker,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_message_bytes: int | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        self.broker = broker
        self._slots = asyncio.Semaphore(max_in_flight)
        limit = broker.capabilities.max_message_bytes
        self.max_message_bytes = min(limit, max_message_bytes) if max_message_bytes else limit
        self.claim_check = claim_check if claim_check is not None else ClaimCheck.from_settings()
        self.inline_limit = self.claim_check.threshold_for(self.max_message_bytes)
        self.metrics = recorder_for(broker)
        self.tracing = tracing_for(broker)

    def encode(self, envelope: Envelope) -> bytes:
        """Encode inline (never offloaded) and check the size; raises :class:`MessageTooLarge` naming the limit."""
        data = encode(envelope)
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(len(data), self.max_message_bytes, self.broker.capabilities.name)
        return data

    async def prepare(self, envelope: Envelope, *, shared: bool = False) -> tuple[bytes, PayloadRef | None]:
        """The bytes to publish for ``envelope``: inline, or a reference after offloading to the payload store."""
        data = encode(envelope)
        if len(data) <= self.inline_limit or self.claim_check.store is None:
            if len(data) > self.max_message_bytes:
                raise MessageTooLarge(len(data), self.max_message_bytes, self.broker.capabilities.name)
            return data, None
        ref = await self.claim_check.offload(envelope, shared=shared)
        return ref.to_bytes(), ref

    async def offload_outgoing(
        self, messages: Sequence[OutgoingMessage], *, shared: bool = False
    ) -> list[OutgoingMessage]:
        """For messages encoded elsewhere (``encode`` of :mod:`taskstream.messages`): bodies over the inline
        limit go to the payload store and are replaced by references, ready for ``Broker.publish_batch``.

        Raises:
            MessageTooLarge: a body is over the broker's limit and no payload store is configured.
        """
        return await self.claim_check.offload_outgoing(
            messages,
            threshold=self.inline_limit,
            max_message_bytes=self.max_message_bytes,
            broker=self.broker.capabilities.name,
            shared=shared,
        )

    async def _discard(self, ref: PayloadRef | None) -> None:
        if ref is not None:
            await self.claim_check.release(ref, force=True)

    async def send(self, queue: str, envelope: Envelope, *, delay: float | None = None) -> None:
        """Publish one envelope; returns when the broker has it."""
        data, ref = await self.prepare(envelope)
        headers = broker_headers(envelope)
        try:
            async with self._slots:
                started = self.metrics.timer()
                with self.tracing.publish(queue, headers, envelope.id):
                    await self.broker.publish(
                        queue, data, headers=headers, message_id=envelope.id, key=envelope.key, delay=delay
                    )
                self.metrics.published(queue, 1, started)
        except _REJECTED:
            self.metrics.publish_failed(queue)
            await self._discard(ref)
            raise
        except Exception:
            self.metrics.publish_failed(queue)
            raise

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Publish messages encoded elsewhere (task calls, stream records) in batches of the broker's
        ``max_batch``: bodies over the inline limit are offloaded first (:meth:`offload_outgoing`).

        Raises:
            MessageTooLarge: a body is over the broker's limit and no payload store is configured.
        """
        ready = await self.offload_outgoing(messages)
        step = max(1, self.broker.capabilities.max_batch)
        for i in range(0, len(ready), step):
            await self._send_batch(queue, ready[i : i + step])

    async def send_many(self, queue: str, envelopes: Iterable[Envelope]) -> None:
        """Publish many envelopes in batches of the broker's ``max_batch``, batches pipelined."""
        batch_size = max(1, self.broker.capabilities.max_batch)
        batch: list[OutgoingMessage] = []
        pending: list[asyncio.Task[None]] = []
        for envelope in envelopes:
            data, _ = await self.prepare(envelope)
            batch.append(OutgoingMessage(data, broker_headers(envelope), message_id=envelope.id, key=envelope.key))
            if len(batch) >= batch_size:
                pending.append(asyncio.create_task(self._send_batch(queue, batch)))
                batch = []
        if batch:
            pending.append(asyncio.create_task(self._send_batch(queue, batch)))
        if pending:
            results = await asyncio.gather(*pending, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _send_batch(self, queue: str, batch: Sequence[OutgoingMessage]) -> None:
        # No discard on failure here: part of a batch may be on the broker already; expiry removes leftovers.
        async with self._slots:
            started = self.metrics.timer()
            try:
                with self.tracing.publish_batch(queue, list(batch)) as traced:
                    await self.broker.publish_batch(queue, traced)
            except Exception:
                self.metrics.publish_failed(queue)
                raise
            self.metrics.published(queue, len(batch), started)

    async def send_topic(self, topic: str, envelope: Envelope) -> None:
        """Publish one envelope to every queue bound to ``topic`` (needs ``capabilities.fanout``)."""
        data, ref = await self.prepare(envelope, shared=True)
        headers = broker_headers(envelope)
        try:
            async with self._slots:
                started = self.metrics.timer()
                with self.tracing.publish(topic, headers, envelope.id):
                    await self.broker.publish_topic(topic, data, headers=headers, message_id=envelope.id)
                self.metrics.published(topic, 1, started)
        except _REJECTED:
            self.metrics.publish_failed(topic)
            await self._discard(ref)
            raise
