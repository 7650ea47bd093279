"""Bundles: several small messages in one broker message, unpacked on intake into deliveries of their own.

A broker message costs the same whether it carries 30 bytes or 30 KiB: a publish, a confirm, a delivery and an
ack, and on RabbitMQ a persistent write. For a no-op task those are nearly all of a round trip's CPU, so the
task client packs calls that are due together into one *bundle*, and a worker packs replies due together to
the same client. A bundle is an envelope of ``kind="bundle"`` whose body lists ``[headers, envelope]`` pairs,
one per message, each exactly what would have travelled alone::

    {"ts": 1, "kind": "bundle", "id": "...", "created_at": ...,
     "body": [[{"ts_kind": "task", "reply_to": "ts-reply-..."}, {"ts": 1, "kind": "task", "id": ...}], ...]}

Reading one (:func:`unpack`, used by the consumer runtime and by the task client's reply listener) gives a
:class:`Part` per pair: a :class:`Delivery` with the message's own body, headers, id and the bundle's attempt,
handled like any other delivery. A part that is broken is refused alone (dead-lettered with its own bytes and
headers and the reason), the parts beside it are handled. The bundle's delivery is settled once every part is:
acked when every part was acked (or dead-lettered); given back when any part asked to be retried or was
requeued by a stopping consumer, after the longest delay asked. The parts that had finished come back too
then; task workers answer those from the result store (their claim finds the task finished), so a retry costs
a duplicate reply, never a second run (and a broken part beside it is dead-lettered again: a duplicate dead
letter). Bundles never nest.

Packing (:func:`pack`) splices the messages' encoded bytes; nothing is encoded twice. What goes into a bundle
is the sender's choice (:func:`fits`): only messages well under the size and depth limits, so a bundle is
never refused for being too large or too deep when its parts alone would not be.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from taskstream.brokers.base import Broker, Delivery, OutgoingMessage
from taskstream.messages import CONTENT_TYPE, MAX_DEPTH, WIRE_VERSION, Envelope, dumps, new_id, short_errors

__all__ = [
    "BROKEN_BUNDLE",
    "BUNDLE_KIND",
    "Coalescer",
    "MAX_PART_BYTES",
    "Part",
    "PartDelivery",
    "bundle_limit",
    "fits",
    "is_bundle",
    "pack",
    "packed",
    "split",
    "unpack",
]

T = TypeVar("T")

BUNDLE_KIND = "bundle"
#: largest message put into a bundle; larger ones travel alone
MAX_PART_BYTES = 16 * 1024
#: largest bundle body (further capped at a quarter of the broker's message limit, see :func:`bundle_limit`)
MAX_BUNDLE_BYTES = 256 * 1024
#: nesting a bundle adds around each message: body list, pair, (the envelope's own level is the message's)
BUNDLE_DEPTH = 2
#: bytes a message's headers and brackets add inside a bundle (a bound used when sizing bundles)
PART_OVERHEAD = 64
_CLOSE = b"]}"
#: why a bundle that gave no parts is dead-lettered whole
BROKEN_BUNDLE = "malformed message: a bundle's body must be a non-empty list of [headers, envelope] pairs"


def bundle_limit(max_message_bytes: int) -> int:
    """The largest bundle body for a broker taking ``max_message_bytes``: a quarter of it, at most 256 KiB."""
    return max(MAX_PART_BYTES, min(MAX_BUNDLE_BYTES, max_message_bytes // 4))


def fits(message: OutgoingMessage) -> bool:
    """Whether ``message`` may go into a bundle: small, no delay or key of its own, shallow enough."""
    body = message.body
    if len(body) > MAX_PART_BYTES or message.delay is not None or message.key is not None:
        return False
    return body.count(b"[") + body.count(b"{") <= MAX_DEPTH - BUNDLE_DEPTH  # an upper bound of its depth


def pack(messages: Sequence[OutgoingMessage]) -> OutgoingMessage:
    """One bundle message carrying ``messages`` (each already encoded; see :func:`fits`)."""
    bundle_id = new_id()
    head = b'{"ts":%d,"id":"%s","kind":"bundle","created_at":%s,"body":[' % (
        WIRE_VERSION,
        bundle_id.encode(),
        repr(time.time()).encode(),
    )
    parts = b",".join(b"[" + dumps(m.headers) + b"," + m.body + b"]" for m in messages)
    headers = {"content_type": CONTENT_TYPE, "ts_kind": BUNDLE_KIND, "ts_parts": len(messages)}
    return OutgoingMessage(head + parts + _CLOSE, headers, message_id=bundle_id)


def split(
    items: Sequence[tuple[OutgoingMessage, T]], max_bytes: int, max_count: int | None = None
) -> list[list[tuple[OutgoingMessage, T]]]:
    """``items`` (a message and what goes with it) in order, cut into groups that each make one bundle of at
    most ``max_bytes`` (and ``max_count`` messages); a message too large for any bundle gets a group of its own."""
    groups: list[list[tuple[OutgoingMessage, T]]] = []
    size = 0
    for item in items:
        grown = size + len(item[0].body) + PART_OVERHEAD
        if not groups or grown > max_bytes or (max_count is not None and len(groups[-1]) >= max_count):
            groups.append([])
            grown = len(item[0].body) + PART_OVERHEAD
        groups[-1].append(item)
        size = grown
    return groups


def packed(group: Sequence[tuple[OutgoingMessage, T]]) -> tuple[OutgoingMessage, list[T]]:
    """One broker message for ``group``: the lone message itself, or a bundle of them all."""
    if len(group) == 1:
        return group[0][0], [group[0][1]]
    return pack([m for m, _ in group]), [item for _, item in group]


def is_bundle(envelope: Envelope | None) -> bool:
    """True for a bundle's envelope."""
    return envelope is not None and envelope.kind == BUNDLE_KIND


@dataclass(slots=True)
class Part:
    """One message of a bundle: its delivery, and its envelope or why it cannot be read."""

    delivery: PartDelivery
    envelope: Envelope | None
    refused: str = ""  # the dead-letter reason when ``envelope`` is None


class _Settlement:
    """Settles a bundle's delivery once every part has settled."""

    __slots__ = ("delay", "delivery", "left", "requeue")

    def __init__(self, delivery: Delivery, count: int) -> None:
        self.delivery = delivery
        self.left = count
        self.requeue = False
        self.delay: float | None = None

    async def part_settled(self, requeue: bool, delay: float | None) -> None:
        if requeue:
            self.requeue = True
            if delay is not None:
                self.delay = max(self.delay or 0.0, delay)
        self.left -= 1
        if self.left:
            return
        if self.requeue:
            await self.delivery.nack(requeue=True, delay=self.delay)
        else:
            await self.delivery.ack()


class PartDelivery(Delivery):
    """A delivery of one message out of a bundle: settling it settles the bundle when it is the last part.

    ``nack(requeue=False)`` counts as done: the runtime dead-letters a message before dropping it.
    """

    __slots__ = ("_settlement",)

    def __init__(self, settlement: _Settlement, *, body: bytes, headers: dict[str, Any], message_id: str) -> None:
        bundle = settlement.delivery
        super().__init__(queue=bundle.queue, body=body, headers=headers, message_id=message_id, attempt=bundle.attempt)
        self._settlement = settlement

    @property
    def bundle_requeued(self) -> bool:
        """Whether the bundle is (to be) given back: some part asked for a retry or was requeued."""
        return self._settlement.requeue

    async def _ack(self) -> None:
        await self._settlement.part_settled(False, None)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        await self._settlement.part_settled(requeue, delay)


def unpack(delivery: Delivery, envelope: Envelope) -> list[Part]:
    """The parts of a bundle that arrived as ``delivery`` (its decoded ``envelope``).

    A body that is not a non-empty list gives no parts: the caller refuses the bundle as a whole with
    :data:`BROKEN_BUNDLE`.
    """
    body = envelope.body
    if not isinstance(body, list) or not body:
        return []
    settlement = _Settlement(delivery, len(body))
    parts: list[Part] = []
    for index, pair in enumerate(body):
        headers, doc, problem = _split(pair)
        message_id = str(doc.get("id")) if isinstance(doc, dict) and isinstance(doc.get("id"), str) else ""
        try:
            raw = orjson.dumps(doc)
        except TypeError:  # only values loads() made (bytes, arrays): encode as they travelled
            raw = dumps(doc)
        part = PartDelivery(
            settlement,
            body=raw,
            headers={**headers, "x-bundle-id": envelope.id, "x-bundle-index": index},
            message_id=message_id or f"{envelope.id}:{index}",
        )
        if problem is None:
            try:
                part_envelope = Envelope.model_validate(doc)
            except Exception as exc:
                problem = f"malformed message: broken taskstream envelope: {short_errors(exc)}"
            else:
                if part_envelope.kind == BUNDLE_KIND:
                    problem = "malformed message: a bundle inside a bundle"
                else:
                    parts.append(Part(part, part_envelope))
                    continue
        parts.append(Part(part, None, problem))
    return parts


def _split(pair: Any) -> tuple[dict[str, Any], Any, str | None]:
    """``(headers, document, problem)`` of one bundle entry."""
    if not isinstance(pair, list) or len(pair) != 2:
        return {}, pair, "malformed message: a bundle entry is not a [headers, envelope] pair"
    headers, doc = pair
    if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
        return {}, doc, "malformed message: a bundle entry's headers are not an object"
    if not (isinstance(doc, dict) and doc.get("ts") == WIRE_VERSION and "kind" in doc):
        return headers, doc, "malformed message: a bundle entry is not a taskstream envelope"
    return headers, doc, None


class Coalescer:
    """Publishes messages to a queue one broker publish at a time, bundling those that wait meanwhile.

    The first message for a queue goes out at once, alone (a lone reply loses no time); messages given while a
    publish to that queue is in flight wait for it and then go together, as one bundle (group commit). Under
    load the bundles grow with the broker's round trip; at rest nothing changes. Messages that do not
    :func:`fits` go alone, beside the others.

    Args:
        broker: where to publish.
        max_bytes: the largest bundle body (:func:`bundle_limit`).
    """

    def __init__(self, broker: Broker, max_bytes: int) -> None:
        self.broker = broker
        self.max_bytes = max_bytes
        self._waiting: dict[str, list[tuple[OutgoingMessage, asyncio.Future[None]]]] = {}
        self._busy: set[str] = set()

    async def publish(self, queue: str, message: OutgoingMessage) -> None:
        """Publish ``message`` to ``queue``; returns once the broker has it (raises what the publish raised)."""
        if not fits(message):
            await self._send(queue, message)
            return
        if queue not in self._busy:
            self._busy.add(queue)
            try:
                await self._send(queue, message)
            finally:
                self._next(queue)
            return
        done = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(queue, []).append((message, done))
        await done

    def _next(self, queue: str) -> None:
        """After a publish to ``queue``: send what waited meanwhile, or mark the queue idle."""
        waiting = self._waiting.pop(queue, None)
        if not waiting:
            self._busy.discard(queue)
            return
        task = asyncio.get_running_loop().create_task(self._send_waiting(queue, waiting))
        task.add_done_callback(lambda _: self._next(queue))

    async def _send_waiting(self, queue: str, waiting: list[tuple[OutgoingMessage, asyncio.Future[None]]]) -> None:
        try:
            for group in split(waiting, self.max_bytes):
                message, waiters = packed(group)
                try:
                    await self._send(queue, message)
                except Exception as exc:
                    _settle(waiters, exc)
                else:
                    _settle(waiters, None)
        finally:  # cancelled (the loop is stopping): nobody may wait for ever
            for _, done in waiting:
                done.cancel()

    async def _send(self, queue: str, message: OutgoingMessage) -> None:
        await self.broker.publish(queue, message.body, headers=message.headers, message_id=message.message_id)


def _settle(waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
    for done in waiters:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
