"""The intake: the one path every message taskstream reads takes.

::

    delivery -> size limit -> decode (depth limit) -> claim-check -> the reader's work
                    \\______________ refused ______________/              |
                         dead-letter, or retry later (store down)     handled -> ack
                                                                      failed  -> retry later | dead-letter

Every reader of a :class:`~taskstream.brokers.base.Subscription` goes through :class:`Intake`: the consumer runtime
(``@app.consumer`` and task workers), stream stage replicas, ``QueueSource``, request/reply services and their
clients, and the task client's reply listener. None of them decodes, retries or dead-letters by itself, so a fix
here is a fix for all of them.

The decision, once:

=====================================  =====================================================================
What happened                          What the intake does
=====================================  =====================================================================
body over the size limit               dead-letter: ``message of N bytes is over the limit of M bytes``
not JSON, not UTF-8, too deep, broken  dead-letter: ``malformed message: ...``
envelope or tagged value
payload reference missing or corrupt   dead-letter: ``payload unavailable: ...`` (the dead letter keeps the
                                       reference, so the payload stays)
payload store unreachable              retry later (:class:`RetryPolicy`), dead-letter after ``max_attempts``
any other exception while reading      dead-letter: ``unreadable message: <type>: ...``
the reader's work failed               :meth:`Intake.retry_or_dead_letter` (the reader decides which)
=====================================  =====================================================================

A dead letter keeps the original bytes and its headers, plus the schema written by :func:`dead_letter_headers`
(the only place these headers are written): ``x-death-reason``, ``x-original-queue``, ``x-original-message-id``,
``x-attempts``, ``x-dead-lettered-at``. Nothing a reader is handed can leave a delivery unsettled: an exception
while settling is logged, and the broker redelivers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from taskstream.brokers.base import Broker, Delivery, OutgoingMessage
from taskstream.errors import MessageError, MessageTooLarge
from taskstream.messages import (
    MAX_DEPTH,
    Envelope,
    envelope_document,
    is_envelope_document,
    loads,
    new_id,
    short_errors,
)
from taskstream.observe.metrics import recorder_for
from taskstream.observe.tracing import tracing_for
from taskstream.payloads.base import PayloadStoreError
from taskstream.payloads.claimcheck import ClaimCheck, PayloadRef, is_reference, open_failure_reason
from taskstream.settings import DEFAULT_MAX_ATTEMPTS

__all__ = [
    "DEAD_LETTER_PREVIEW",
    "Intake",
    "IntakeStats",
    "Opened",
    "Refused",
    "REPLY_DEAD_LETTERS",
    "RetryPolicy",
    "dead_letter_headers",
    "reply_dead_letter_queue",
]

log = logging.getLogger("taskstream.intake")

#: bytes of the original body kept when a body is too large even for the dead-letter queue
DEAD_LETTER_PREVIEW = 4096
#: longest ``x-death-reason`` written
MAX_REASON = 4000
#: reply queues are private and short-lived; what cannot be read on any of them goes to this queue's dead letters
REPLY_DEAD_LETTERS = "ts-replies"


def reply_dead_letter_queue(broker: Broker) -> str:
    """The one dead-letter queue of every reply queue on ``broker`` (``ts-replies.dlq``; ``-dlq``, ``-poison``).

    Reply queues are deleted when their client stops; one shared dead-letter queue keeps what could not be read
    without leaving a dead-letter queue behind per client.
    """
    return broker.dead_letter_name(REPLY_DEAD_LETTERS)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with a cap and jitter: the one retry policy of consumers, task workers, stream stages
    and services.

    Attributes:
        initial: delay in seconds before the retry that follows the first delivery.
        factor: multiplier per further delivery.
        max_delay: cap in seconds.
        jitter: the delay is spread by up to this fraction either way, so a burst of failures does not come back
            as a burst (0 for exact delays).

    Example:
        >>> RetryPolicy(initial=1.0, jitter=0).delay(3)
        4.0
    """

    initial: float = 0.5
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the retry that follows delivery number ``attempt`` (1-based)."""
        exponent = min(max(0, attempt - 1), 64)  # no float overflow for absurd attempt counts
        base = min(self.max_delay, self.initial * self.factor**exponent)
        if self.jitter:
            base *= 1.0 + random.uniform(-self.jitter, self.jitter)  # spreading, not security
        return float(max(0.0, min(self.max_delay, base)))


def dead_letter_headers(
    headers: Mapping[str, Any],
    reason: str,
    *,
    queue: str,
    message_id: str | None,
    attempts: int,
    **extra: Any,
) -> dict[str, Any]:
    """The headers of a dead letter: the original ones plus the reason schema (the one place it is written).

    Example:
        >>> h = dead_letter_headers({"a": 1}, "boom", queue="in", message_id="m1", attempts=2)
        >>> h["x-death-reason"], h["x-original-queue"], h["x-attempts"]
        ('boom', 'in', 2)
    """
    out = dict(headers)
    out.update(
        {
            "x-death-reason": reason[:MAX_REASON],
            "x-original-queue": queue,
            "x-original-message-id": message_id or "",
            "x-attempts": attempts,
            "x-dead-lettered-at": time.time(),
        }
    )
    out.update(extra)
    return out


@dataclass(slots=True)
class IntakeStats:
    """Counters of one reader, for tests, health checks and progress output."""

    received: int = 0
    acked: int = 0
    ack_failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    requeued_on_stop: int = 0
    in_flight: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Opened:
    """A delivery that decoded.

    Attributes:
        delivery: where it came from (settle it when the work is done).
        doc: the decoded JSON: an envelope document (``is_envelope_document(doc)``) or a foreign value.
        ref: the payload reference it came as, if any; release it after the final ack.
        envelope: the :class:`Envelope` (from :meth:`Intake.open`; ``None`` from :meth:`Intake.read`).
    """

    delivery: Delivery
    doc: Any
    ref: PayloadRef | None = None
    envelope: Envelope | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """A delivery that cannot be read. ``transient``: the payload store failed; retry later."""

    reason: str
    transient: bool = False


DeadLetterHook = Callable[[Delivery, Envelope | None, str], Awaitable[None]]


class Intake:
    """Reads, retries and dead-letters the deliveries of one queue.

    Args:
        broker: where the queue and its dead-letter queue live.
        queue: the queue read.
        claim_check: resolves payload references (:mod:`taskstream.payloads`).
        dead_letter_queue: ``None`` for ``broker.dead_letter_name(queue)``.
        max_attempts: deliveries before a failing message is dead-lettered.
        retry: the backoff between attempts.
        max_bytes: the largest body read; default the broker's ``max_message_bytes``.
        max_depth: the deepest nesting read.
        stats: counters to update (shared with the reader's own).
        on_dead_letter: awaited after a message was dead-lettered, with its envelope when it decoded (task
            workers answer the waiting client with it).
    """

    def __init__(
        self,
        broker: Broker,
        queue: str,
        *,
        claim_check: ClaimCheck,
        dead_letter_queue: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry: RetryPolicy | None = None,
        max_bytes: int | None = None,
        max_depth: int = MAX_DEPTH,
        stats: IntakeStats | None = None,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.claim_check = claim_check
        self.dead_letter_queue = dead_letter_queue or broker.dead_letter_name(queue)
        self.max_attempts = max_attempts
        self.retry = retry or RetryPolicy()
        limit = broker.capabilities.max_message_bytes
        self.max_bytes = min(limit, max_bytes) if max_bytes else limit
        self.max_depth = max_depth
        self.stats = stats if stats is not None else IntakeStats()
        self.on_dead_letter = on_dead_letter
        self._dead_letter_declared = False
        self.metrics = recorder_for(broker).for_intake(self)
        """This queue's metrics (a no-op unless the broker has a recorder, :mod:`taskstream.observe.metrics`)."""
        self.tracing = tracing_for(broker)
        """Trace spans of this reader (a no-op unless a tracer provider is set, :mod:`taskstream.observe.tracing`)."""

    # -- reading ----------------------------------------------------------------------------------------

    async def read(self, delivery: Delivery) -> Opened | Refused:
        """Decode ``delivery`` into its JSON document (no :class:`Envelope` built; stream stages use this).

        Never raises (but ``CancelledError``): whatever goes wrong is a :class:`Refused` with the reason.
        """
        self.metrics.received()
        body = delivery.body
        if len(body) > self.max_bytes:
            return Refused(f"message of {len(body)} bytes is over the limit of {self.max_bytes} bytes")
        try:
            if is_reference(body):
                envelope, ref = await self.claim_check.open(body, message_id=delivery.message_id)
                return Opened(delivery, _document(envelope), ref, envelope)
            return Opened(delivery, loads(body, max_depth=self.max_depth))
        except MessageError as exc:
            return Refused(open_failure_reason(exc))
        except PayloadStoreError as exc:
            return Refused(str(exc), transient=True)
        except Exception as exc:  # nothing a message holds may stop a reader
            return Refused(f"unreadable message: {type(exc).__name__}: {exc}")

    async def decode(self, delivery: Delivery) -> Opened | Refused:
        """Like :meth:`read`, with the :class:`Envelope` built (foreign JSON becomes ``kind="raw"``)."""
        opened = await self.read(delivery)
        if isinstance(opened, Refused) or opened.envelope is not None:
            return opened
        doc = opened.doc
        try:
            if is_envelope_document(doc):
                opened.envelope = Envelope.model_validate(doc)
            else:
                opened.envelope = Envelope(id=delivery.message_id or new_id(), kind="raw", body=doc)
        except Exception as exc:
            return Refused(f"malformed message: broken taskstream envelope: {short_errors(exc)}")
        return opened

    async def open(self, delivery: Delivery) -> Opened | None:
        """:meth:`decode`, settling a refused delivery (dead-letter or retry later); ``None`` when it was."""
        opened = await self.decode(delivery)
        if isinstance(opened, Refused):
            await self.refuse(delivery, opened)
            return None
        return opened

    # -- settling ---------------------------------------------------------------------------------------

    async def refuse(self, delivery: Delivery, refused: Refused, envelope: Envelope | None = None) -> None:
        """Settle a delivery that could not be read: retry later when transient, else dead-letter."""
        if refused.transient:
            self.stats.last_error = refused.reason
            await self.retry_or_dead_letter(delivery, refused.reason, envelope=envelope)
        else:
            await self.dead_letter(delivery, refused.reason, envelope=envelope)

    def give_up_reason(self, delivery: Delivery, reason: str) -> str | None:
        """The dead-letter reason once ``delivery`` has had ``max_attempts`` deliveries, else ``None``."""
        if delivery.attempt >= self.max_attempts:
            return f"failed {delivery.attempt} times (max_attempts={self.max_attempts}); last error: {reason}"
        return None

    async def retry_later(self, delivery: Delivery, delay: float | None = None) -> None:
        """Requeue ``delivery`` after the policy's delay (or ``delay``)."""
        self.stats.retried += 1
        self.metrics.retried()
        pause = self.retry.delay(delivery.attempt) if delay is None else delay
        pause = min(pause, self.broker.capabilities.max_delay)  # the longest delay the broker can keep
        await self.settle_quietly(delivery.nack(requeue=True, delay=pause))

    async def retry_or_dead_letter(
        self, delivery: Delivery, reason: str, delay: float | None = None, *, envelope: Envelope | None = None
    ) -> None:
        """Requeue with backoff while attempts remain, then dead-letter with the last error."""
        final = self.give_up_reason(delivery, reason)
        if final is not None:
            await self.dead_letter(delivery, final, envelope=envelope)
        else:
            await self.retry_later(delivery, delay)

    def dead_letter_message(self, delivery: Delivery, reason: str, **extra: Any) -> OutgoingMessage:
        """The dead letter of ``delivery`` (for readers that publish it with their own outputs, then ack)."""
        self._count_dead_letter(delivery, reason)
        return self._dead_letter_message(delivery, reason, **extra)

    def _count_dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.stats.dead_lettered += 1
        self.metrics.dead_lettered(reason)
        log.warning("dead-lettering message %s from %r: %s", delivery.message_id, self.queue, reason)

    def _dead_letter_message(self, delivery: Delivery, reason: str, **extra: Any) -> OutgoingMessage:
        body = delivery.body
        if len(body) > self.broker.capabilities.max_message_bytes:  # cannot travel: keep the reason and a preview
            extra = {**extra, "x-truncated-from": len(body)}
            body = body[:DEAD_LETTER_PREVIEW]
        headers = dead_letter_headers(
            delivery.headers,
            reason,
            queue=delivery.queue or self.queue,
            message_id=delivery.message_id,
            attempts=delivery.attempt,
            **extra,
        )
        return OutgoingMessage(body, headers, message_id=delivery.message_id, key=delivery.key)

    async def dead_letter(self, delivery: Delivery, reason: str, *, envelope: Envelope | None = None) -> None:
        """Publish ``delivery`` to the dead-letter queue with ``reason``, then ack it.

        When even the dead-letter publish fails, the message stays on its queue (requeued after the policy's
        longest delay) rather than being lost.
        """
        message = self._dead_letter_message(delivery, reason)
        try:
            await self._publish_dead_letter(message)
        except Exception as exc:
            log.error("dead-letter publish to %r failed (%s); requeueing", self.dead_letter_queue, exc)
            await self.settle_quietly(delivery.nack(requeue=True, delay=self.retry.max_delay))
            return
        self._count_dead_letter(delivery, reason)
        await self.settle_quietly(delivery.ack())
        if self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(delivery, envelope, reason)
            except Exception as exc:
                log.warning("dead-letter hook for %r failed: %s: %s", self.queue, type(exc).__name__, exc)

    async def _publish_dead_letter(self, message: OutgoingMessage) -> None:
        if not self._dead_letter_declared:
            await self.broker.declare(self.dead_letter_queue)
            self._dead_letter_declared = True
        try:
            await self.broker.publish(
                self.dead_letter_queue, message.body, headers=message.headers, message_id=message.message_id
            )
        except MessageTooLarge:  # too large even for the dead-letter queue: keep the reason and a preview
            headers = {**message.headers, "x-truncated-from": len(message.body)}
            await self.broker.publish(
                self.dead_letter_queue,
                message.body[:DEAD_LETTER_PREVIEW],
                headers=headers,
                message_id=message.message_id,
            )

    async def settle_quietly(self, settle: Awaitable[None]) -> None:
        """Await an ack or nack; a broker that is gone redelivers by itself, so failures are only logged."""
        try:
            await settle
        except Exception as exc:
            self.stats.last_error = f"settle failed: {type(exc).__name__}: {exc}"
            log.warning("could not settle a message on %r: %s", self.queue, exc)

    async def requeue_on_stop(self, delivery: Delivery) -> None:
        """Give a delivery back untouched (the reader is stopping), shielded from the stop's cancellation."""
        self.stats.requeued_on_stop += 1
        await asyncio.shield(self.settle_quietly(delivery.nack(requeue=True)))


def _document(envelope: Envelope) -> Any:
    """The document :func:`~taskstream.messages.loads` gives for the inline bytes of ``envelope``."""
    return envelope.body if envelope.kind == "raw" else envelope_document(envelope)
