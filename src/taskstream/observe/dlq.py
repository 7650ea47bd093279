"""Dead letters on any broker: list, show, replay and purge them (the library behind ``taskstream dlq``).

Every function takes a connected :class:`~taskstream.brokers.base.Broker` and a queue name; the dead-letter
queue is ``broker.dead_letter_name(queue)`` (``<queue>.dlq``, ``<queue>-dlq`` on SQS, ``<queue>-poison`` on
Azure Storage Queues) unless ``dead_letter=`` names another (a pipeline's ``<pipeline>-dead-letters``).

Reading never loses or reorders a dead letter to death: the queue is consumed with a prefetch as large as
what is read, every delivery is held unacked until the operation is done, then each one not replayed is
given back with ``nack(requeue=True)``, in the order it came. Nothing is acked except a replayed message,
and only after the broker accepted its copy on the original queue.

Example:
    >>> async def example(broker):
    ...     for letter in await list_dead_letters(broker, "orders.in"):
    ...         print(letter.message_id, letter.reason)
    ...     result = await replay_dead_letters(broker, "orders.in", reason_contains="KeyError")
    ...     print(len(result.replayed), "sent back")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from taskstream.brokers.base import Broker, Delivery, Subscription
from taskstream.errors import ConfigurationError, QueueNotFound, TaskstreamError

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_SCAN",
    "DEFAULT_WAIT",
    "DeadLetter",
    "DeadLetterNotFound",
    "ReplayResult",
    "get_dead_letter",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
    "replay_headers",
]

log = logging.getLogger("taskstream.observe")

DEFAULT_LIST_LIMIT = 100
"""Most dead letters ``list_dead_letters`` reads by default."""
DEFAULT_SCAN = 1000
"""Most dead letters ``get_dead_letter`` and ``replay_dead_letters`` look through by default."""
DEFAULT_WAIT = 5.0
"""Seconds to wait for the next dead letter while fewer than the queue's depth have arrived."""

#: Headers that describe a death (taskstream's and RabbitMQ's own); a replayed message leaves them behind.
_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-death-reason",
        "x-original-queue",
        "x-original-message-id",
        "x-attempts",
        "x-dead-lettered-at",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
REPLAYED_HEADER = "x-replayed"


class DeadLetterNotFound(TaskstreamError):
    """No dead letter with that message id in the dead-letter queue."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of a dead-letter queue, as read (it stays on the queue).

    Attributes:
        message_id: the message's id (the same as on its original queue).
        dead_letter_queue: the queue it was read from.
        original_queue: where it failed (``x-original-queue``; RabbitMQ's ``x-first-death-queue`` for a
            broker-side reject), and where a replay sends it.
        reason: ``x-death-reason`` (RabbitMQ's ``x-first-death-reason`` for a broker-side reject).
        attempts: ``x-attempts``, the deliveries it had before it was dead-lettered.
        dead_lettered_at: ``x-dead-lettered-at``, epoch seconds.
        headers: every header it carries.
        body: its original bytes.
        key: its partition key, if it had one.
    """

    message_id: str
    dead_letter_queue: str
    original_queue: str
    reason: str | None
    attempts: int | None
    dead_lettered_at: float | None
    headers: dict[str, Any]
    body: bytes
    key: str | None = None

    @classmethod
    def from_delivery(cls, delivery: Delivery, default_queue: str) -> DeadLetter:
        """Read the death headers of ``delivery``; ``default_queue`` when it names no original queue."""
        headers = dict(delivery.headers)
        original = headers.get("x-original-queue") or headers.get("x-first-death-queue") or default_queue
        reason = headers.get("x-death-reason") or headers.get("x-first-death-reason")
        return cls(
            message_id=delivery.message_id,
            dead_letter_queue=delivery.queue,
            original_queue=str(original),
            reason=None if reason is None else str(reason),
            attempts=_as_int(headers.get("x-attempts")),
            dead_lettered_at=_as_float(headers.get("x-dead-lettered-at")),
            headers=headers,
            body=bytes(delivery.body),
            key=delivery.key,
        )

    @property
    def size(self) -> int:
        """Body size in bytes."""
        return len(self.body)

    @property
    def dead_lettered_iso(self) -> str | None:
        """``dead_lettered_at`` as an ISO 8601 UTC time, or ``None``."""
        if self.dead_lettered_at is None:
            return None
        moment = datetime.datetime.fromtimestamp(self.dead_lettered_at, tz=datetime.UTC)
        return moment.isoformat(timespec="seconds")

    def body_text(self) -> tuple[str, str]:
        """``("json", text)`` when the body is UTF-8 JSON, else ``("base64", base64 of the bytes)``."""
        try:
            text = self.body.decode("utf-8")
            orjson.loads(self.body)
        except (UnicodeDecodeError, orjson.JSONDecodeError):
            return "base64", base64.b64encode(self.body).decode("ascii")
        return "json", text

    def preview(self, width: int = 60) -> str:
        """The start of the body on one line: text when it is UTF-8, else hex."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            text = "0x" + self.body[: width // 2].hex()
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    def summary(self) -> dict[str, Any]:
        """The listing fields as JSON-ready data (no body, a preview)."""
        return {
            "message_id": self.message_id,
            "original_queue": self.original_queue,
            "reason": self.reason,
            "attempts": self.attempts,
            "dead_lettered_at": self.dead_lettered_iso,
            "size": self.size,
            "preview": self.preview(),
        }

    def details(self) -> dict[str, Any]:
        """Everything, JSON-ready: the summary, the headers and the body (as JSON text or base64)."""
        encoding, text = self.body_text()
        return {
            **self.summary(),
            "dead_letter_queue": self.dead_letter_queue,
            "key": self.key,
            "headers": _jsonable(self.headers),
            "body_encoding": encoding,
            "body": text,
        }

    def matches(self, *, ids: Collection[str] | None = None, reason_contains: str | None = None) -> bool:
        """True when the id is one of ``ids`` (if given) and the reason contains the text (if given)."""
        if ids is not None and self.message_id not in ids:
            return False
        return reason_contains is None or reason_contains.lower() in (self.reason or "").lower()


@dataclass(slots=True)
class ReplayResult:
    """What :func:`replay_dead_letters` did.

    Attributes:
        replayed: dead letters sent back to their original queue and removed from the dead-letter queue
            (with ``dry_run``: the ones that would be).
        failed: dead letters whose publish the broker refused, with the reason; they stay dead-lettered.
        kept: how many dead letters were read and given back untouched (no match, or over the limit).
        dry_run: nothing was sent or removed.
    """

    replayed: list[DeadLetter] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    kept: int = 0
    dry_run: bool = False


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a replayed message carries: the death headers removed, ``x-replayed`` counted up."""
    out = {name: value for name, value in headers.items() if name not in _DEATH_HEADERS}
    out[REPLAYED_HEADER] = (_as_int(headers.get(REPLAYED_HEADER)) or 0) + 1
    return out


def _dead_letter_queue(broker: Broker, queue: str, dead_letter: str | None) -> str:
    if not queue:
        raise ConfigurationError("queue name must not be empty")
    return dead_letter or broker.dead_letter_name(queue)


@contextlib.asynccontextmanager
async def _held(broker: Broker, dlq: str, most: int, wait: float) -> AsyncIterator[list[Delivery]]:
    """Read up to ``most`` deliveries of ``dlq`` and hold them; on exit give back every unsettled one."""
    if most < 1:
        raise ConfigurationError(f"the number of dead letters to read must be at least 1, got {most}")
    try:
        depth = await broker.depth(dlq)
    except QueueNotFound:
        raise QueueNotFound(
            f"dead-letter queue {dlq!r} does not exist: nothing was dead-lettered there yet, or the queue name is wrong"
        ) from None
    want = min(most, depth)
    deliveries: list[Delivery] = []
    subscription: Subscription | None = None
    try:
        if want > 0:
            subscription = broker.consume(dlq, prefetch=want)
            await _receive(subscription, deliveries, want, wait)
        yield deliveries
    finally:
        await asyncio.shield(_give_back(deliveries, subscription))


async def _receive(subscription: Subscription, into: list[Delivery], want: int, wait: float) -> None:
    """Append deliveries until ``want`` came or none came for ``wait`` seconds (the depth was approximate)."""
    while len(into) < want:
        try:
            async with asyncio.timeout(wait):
                into.append(await subscription.__anext__())
        except (TimeoutError, StopAsyncIteration):
            return


async def _give_back(deliveries: list[Delivery], subscription: Subscription | None) -> None:
    for delivery in deliveries:  # in the order they came, so they stay in that order
        if not delivery.settled:
            try:
                await delivery.nack(requeue=True)
            except Exception as exc:  # the broker returns it by itself (channel closed, visibility timeout)
                log.warning("could not give back dead letter %s: %s", delivery.message_id, exc)
    if subscription is not None:
        await subscription.close()


async def list_dead_letters(
    broker: Broker,
    queue: str,
    *,
    limit: int = DEFAULT_LIST_LIMIT,
    dead_letter: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> list[DeadLetter]:
    """The first ``limit`` dead letters of ``queue``; they all stay on the dead-letter queue.

    Args:
        broker: a connected broker.
        queue: the queue whose dead letters to read.
        limit: most dead letters to read.
        dead_letter: the dead-letter queue, when it is not ``broker.dead_letter_name(queue)``.
        wait: seconds to wait for the next one while fewer than the queue's depth arrived.

    Raises:
        QueueNotFound: the dead-letter queue does not exist.
    """
    dlq = _dead_letter_queue(broker, queue, dead_letter)
    async with _held(broker, dlq, limit, wait) as deliveries:
        return [DeadLetter.from_delivery(d, queue) for d in deliveries]


async def get_dead_letter(
    broker: Broker,
    queue: str,
    message_id: str,
    *,
    scan: int = DEFAULT_SCAN,
    dead_letter: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> DeadLetter:
    """The dead letter of ``queue`` with ``message_id`` (looking through at most ``scan`` of them).

    Raises:
        DeadLetterNotFound: no such message among the first ``scan`` dead letters.
        QueueNotFound: the dead-letter queue does not exist.
    """
    dlq = _dead_letter_queue(broker, queue, dead_letter)
    async with _held(broker, dlq, scan, wait) as deliveries:
        for delivery in deliveries:
            if delivery.message_id == message_id:
                return DeadLetter.from_delivery(delivery, queue)
        raise DeadLetterNotFound(
            f"no dead letter with message id {message_id!r} among the {len(deliveries)} read from {dlq!r}"
        )


async def replay_dead_letters(
    broker: Broker,
    queue: str,
    *,
    ids: Collection[str] | None = None,
    reason_contains: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    scan: int = DEFAULT_SCAN,
    dead_letter: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> ReplayResult:
    """Send the matching dead letters of ``queue`` back to their original queue.

    A replayed message keeps its bytes, message id and key; its death headers are removed and ``x-replayed``
    counts the replays. It is acked from the dead-letter queue only after the broker accepted the copy; a
    refused publish leaves it dead-lettered (in ``failed``). Copies with the same message id (a message that
    died twice) are sent once and all removed. Dead letters that do not match go back untouched.

    Args:
        broker: a connected broker.
        queue: the queue whose dead letters to replay (also the target when a dead letter names none).
        ids: replay only these message ids.
        reason_contains: replay only dead letters whose reason contains this text (case-insensitive).
        limit: replay at most this many.
        dry_run: only say what would be replayed; nothing is sent or removed.
        scan: most dead letters to look through.
        dead_letter: the dead-letter queue, when it is not ``broker.dead_letter_name(queue)``.
        wait: seconds to wait for the next one while fewer than the queue's depth arrived.

    Raises:
        QueueNotFound: the dead-letter queue does not exist.
    """
    if limit is not None and limit < 0:
        raise ConfigurationError(f"limit must not be negative, got {limit}")
    dlq = _dead_letter_queue(broker, queue, dead_letter)
    wanted = set(ids) if ids is not None else None
    result = ReplayResult(dry_run=dry_run)
    async with _held(broker, dlq, scan, wait) as deliveries:
        chosen: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            letter = DeadLetter.from_delivery(delivery, queue)
            if delivery.message_id in chosen:
                chosen[delivery.message_id].append(delivery)
            elif letter.matches(ids=wanted, reason_contains=reason_contains) and (limit is None or len(chosen) < limit):
                chosen[delivery.message_id] = [delivery]
        for copies in chosen.values():
            letter = DeadLetter.from_delivery(copies[0], queue)
            if dry_run:
                result.replayed.append(letter)
                continue
            error = await _replay_one(broker, letter, copies)
            if error is None:
                result.replayed.append(letter)
            else:
                result.failed.append((letter, error))
        result.kept = sum(1 for d in deliveries if not d.settled)
    return result


async def _replay_one(broker: Broker, letter: DeadLetter, copies: list[Delivery]) -> str | None:
    """Publish ``letter`` to its original queue, then ack every copy; the error text if the publish failed."""
    try:
        await broker.publish(
            letter.original_queue,
            letter.body,
            headers=replay_headers(letter.headers),
            message_id=letter.message_id,
            key=letter.key,
        )
    except Exception as exc:
        log.warning("replay of %s to %r failed: %s", letter.message_id, letter.original_queue, exc)
        return f"{type(exc).__name__}: {exc}"
    for delivery in copies:
        try:
            await delivery.ack()
        except Exception as exc:  # the copy was sent: a failed ack means a duplicate later, not a loss
            log.warning("replayed %s but could not remove it from the dead-letter queue: %s", letter.message_id, exc)
    return None


async def purge_dead_letters(broker: Broker, queue: str, *, dead_letter: str | None = None) -> int:
    """Empty the dead-letter queue of ``queue``; returns its depth just before (approximate on some brokers).

    Raises:
        QueueNotFound: the dead-letter queue does not exist.
    """
    dlq = _dead_letter_queue(broker, queue, dead_letter)
    try:
        depth = await broker.depth(dlq)
    except QueueNotFound:
        raise QueueNotFound(f"dead-letter queue {dlq!r} does not exist") from None
    await broker.purge(dlq)
    return depth


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    """Headers as JSON-ready data (bytes as text or base64)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
