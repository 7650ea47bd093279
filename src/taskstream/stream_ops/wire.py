"""How records and control messages travel between stages.

Records travel in **record batches**: one broker message carries the records of one input batch bound for one
stage queue (one replica), as a ``kind="record"`` envelope with the header ``"batch": 1`` whose body is a list
of records, each a 5-list::

    {"ts": 1, "id": "<batch id>", "kind": "record", "created_at": 1767225600.0,
     "headers": {"src": "sensor/0", "batch": 1},
     "body": [["<record id>", "<to>", <g>, "<key>" | null, <value>], ...]}

``src`` is ``"<stage>/<replica>"`` of the sender; per record, ``id`` is the record's id (derived from its
lineage, :mod:`~taskstream.stream_ops.lineage`), ``to`` the step (or list of steps) receiving it downstream, or
``"*"`` (:data:`ALL_ENTRIES`) for every entry step of the receiving stage in the stage's order (what a record
bound for all of them carries: one short string to decode instead of a list of names per record),
``g`` its key group (:mod:`.keygroups`), ``key`` the key of a keyed item ``(key, value)`` (``null`` for an
unkeyed one) and ``value`` the item. A replica deduplicates **per record id**, not per batch: a batch is made
from an input batch, and input batches are not made again the same way after a restart (a source read under
realtime pacing, deliveries gathered within ``linger``), so the same records can come back grouped otherwise.
The batch id is derived from its sender and its first and last record ids; it names the message (dead letters
point at it). A record of a batch that is malformed is dead-lettered alone, with the reason; the others are
applied. Batches stay under the claim-check threshold of the broker (:class:`BatchLimits`); a single record
over it travels by reference.

(The batch travels as a record envelope, not a kind of its own, so that every reader of envelopes, the
claim-check's included, takes it as it is.) A single record (``kind="record"`` without ``batch``, a keyed item
as ``key=key, body=value``, headers ``to``, ``src``, ``g``) is still read, for messages written by earlier
versions and by hand; stages no longer send it. Record batches travel only between taskstream's own stages: a
``QueueSink`` publishes one message per record.

Control envelopes (``kind="control"``) are single messages:

==============================================================  =============================================
Body                                                            Meaning
==============================================================  =============================================
``{"control": "eos", "from": "stage/replica", "sent": {g: n}}``  that upstream replica finished after sending
                                                                ``n`` records of key group ``g`` to this stage
``{"control": "stop"}``                                         end this component now (flush, end-of-stream
                                                                down)
==============================================================  =============================================

Large records travel by reference (claim-check, :mod:`taskstream.payloads`), as task arguments do: whoever
publishes records (stage outputs, dead letters, ``QueueSink``) passes them through
:meth:`Producer.offload_outgoing <taskstream.producer.Producer.offload_outgoing>`; whoever reads them (stage
replicas, ``QueueSource``) reads through the :mod:`intake <taskstream.intake>`, which resolves a reference, and
releases the blob after the final ack. A record that is dead-lettered keeps its reference, so its payload
stays. Small records pay one prefix comparison per message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from taskstream.brokers.base import Broker, OutgoingMessage
from taskstream.errors import MalformedMessage
from taskstream.messages import CONTENT_TYPE, WIRE_VERSION, dumps, new_id
from taskstream.stream_ops.keygroups import KEY_GROUPS
from taskstream.stream_ops.lineage import derive_id

__all__ = [
    "ALL_ENTRIES",
    "BatchLimits",
    "Record",
    "Stop",
    "batch_entry",
    "batch_messages",
    "control_message",
    "is_batch",
    "pack_records",
    "read_batch",
    "read_entry",
    "read_record",
    "record_message",
    "send_stop",
]

ALL_ENTRIES = "*"  # a record's ``to`` naming every entry step of the stage it is sent to (never a step name)
RECORD_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "record"}
CONTROL_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "control"}
BATCH_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "record", "ts_batch": 1}
MAX_BATCH_BYTES = 256 * 1024  # a batch message stays under this (and under the broker's claim-check threshold)


def record_message(
    item: Any, to: str | list[str], src: str, now: float, mid: str | None = None, group: int | None = None
) -> OutgoingMessage:
    """Encode one item for the stage queue of step ``to`` (or of several steps of that stage).

    ``mid`` is the record's id (derived from its lineage, :mod:`~taskstream.stream_ops.lineage`); a new random
    one when not given. ``group`` is its key group (:mod:`~taskstream.stream_ops.keygroups`).
    """
    mid = mid or new_id()
    headers: dict[str, Any] = {"to": to, "src": src}
    if group is not None:
        headers["g"] = group
    doc: dict[str, Any] = {
        "ts": WIRE_VERSION,
        "id": mid,
        "kind": "record",
        "created_at": now,
        "headers": headers,
        "body": item,
    }
    key = None
    if type(item) is tuple and len(item) == 2 and type(item[0]) is str:
        key = item[0]
        doc["key"] = key
        doc["body"] = item[1]
    return OutgoingMessage(dumps(doc), RECORD_HEADERS, message_id=mid, key=key)


def batch_entry(item: Any, to: str | list[str], mid: str, group: int) -> bytes:
    """Encode one item as a record of a batch, ``[id, to, g, key, value]``.

    Raises:
        TypeError: the item holds a value the wire format does not carry.
    """
    if type(item) is tuple and len(item) == 2 and type(item[0]) is str:
        return dumps([mid, to, group, item[0], item[1]])
    return dumps([mid, to, group, None, item])


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How large a batch message grows: ``max_bytes`` of encoded records (a record alone may exceed it)."""

    max_bytes: int = MAX_BATCH_BYTES


def batch_messages(
    records: list[tuple[str, bytes]], src: str, now: float, limits: BatchLimits = BatchLimits()
) -> list[OutgoingMessage]:
    """Pack encoded records (``(id, bytes)`` from :func:`batch_entry`) into as few batch messages as the limits
    allow, in order."""
    out: list[OutgoingMessage] = []
    start, size = 0, 0
    for index, (_, data) in enumerate(records):
        if size and size + len(data) + 1 > limits.max_bytes:
            out.append(_batch(records[start:index], src, now))
            start, size = index, 0
        size += len(data) + 1
    if start < len(records):
        out.append(_batch(records[start:], src, now))
    return out


def _batch(records: list[tuple[str, bytes]], src: str, now: float) -> OutgoingMessage:
    return _batch_of(records[0][0], records[-1][0], len(records), b",".join(data for _, data in records), src, now)


def _batch_of(first: str, last: str, count: int, body: bytes, src: str, now: float) -> OutgoingMessage:
    """A batch message of ``count`` records from ``first`` to ``last`` (ids) whose JSON, comma-joined, is
    ``body``."""
    bid = derive_id("batch", src, first, last, count)
    head = dumps(
        {"ts": WIRE_VERSION, "id": bid, "kind": "record", "created_at": now, "headers": {"src": src, "batch": 1}}
    )
    return OutgoingMessage(b"".join((head[:-1], b',"body":[', body, b"]}")), BATCH_HEADERS, message_id=bid)


def pack_records(
    chunks: Sequence[tuple[Sequence[Sequence[Any]], bytes]],
    src: str,
    now: float,
    limits: BatchLimits = BatchLimits(),
) -> list[OutgoingMessage]:
    """Pack chunks of records into batch messages, in order: each chunk is records ``[id, to, g, key, value]``
    (lists or tuples) and their JSON list (one ``dumps`` of them). Chunks are joined while they fit in
    ``limits``; a chunk larger than the limit is split record by record (:func:`batch_messages`)."""
    out: list[OutgoingMessage] = []
    held: list[tuple[Sequence[Sequence[Any]], bytes]] = []
    size = 0

    def close() -> None:
        if held:
            first, last = held[0][0][0][0], held[-1][0][-1][0]
            count = sum(len(rows) for rows, _ in held)
            out.append(_batch_of(first, last, count, b",".join(data[1:-1] for _, data in held), src, now))
            held.clear()

    for rows, data in chunks:
        if len(data) > limits.max_bytes and len(rows) > 1:
            close()
            size = 0
            out.extend(batch_messages([(row[0], dumps(row)) for row in rows], src, now, limits))
            continue
        if held and size + len(data) > limits.max_bytes:
            close()
            size = 0
        held.append((rows, data))
        size += len(data)
    close()
    return out


def is_batch(doc: dict[str, Any]) -> bool:
    """True for a record batch envelope (an envelope document, checked by the caller)."""
    headers = doc.get("headers")
    return doc.get("kind") == "record" and type(headers) is dict and headers.get("batch") == 1


def read_batch(doc: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """The sender and the raw records of a batch envelope (check each with :func:`read_entry`).

    Raises:
        MalformedMessage: the body is not a list, or ``src`` not a string.
    """
    headers = doc.get("headers") or {}
    src = headers.get("src") if isinstance(headers, dict) else None
    body = doc.get("body")
    if not isinstance(body, list):
        raise MalformedMessage("malformed message: a record batch's body must be a list of records")
    if src is not None and not isinstance(src, str):
        raise MalformedMessage("malformed message: header 'src' must be a string")
    return src, body


def read_entry(entry: Any, src: str | None) -> Record:
    """Check one record of a batch (``[id, to, g, key, value]``; a hostile one may hold anything).

    Raises:
        MalformedMessage: the record is not such a list, or a field has the wrong type, naming it.
    """
    if type(entry) is not list or len(entry) != 5:
        raise MalformedMessage("malformed record in batch: not a list [id, to, g, key, value]")
    mid, to, group, key, body = entry
    if not isinstance(mid, str) or not mid:
        raise MalformedMessage("malformed record in batch: the id must be a non-empty string")
    if not (isinstance(to, str) or (isinstance(to, list) and to and all(isinstance(t, str) for t in to))):
        raise MalformedMessage("malformed record in batch: 'to' must be a step name or a list of them")
    if type(group) is not int or not 0 <= group < KEY_GROUPS:
        raise MalformedMessage(f"malformed record in batch: 'g' must be a key group (0-{KEY_GROUPS - 1})")
    if key is not None and not isinstance(key, str):
        raise MalformedMessage(f"malformed record in batch: the key must be a string, not {type(key).__name__}")
    return Record(mid, "record", to, src, key, body, group)


def control_message(body: dict[str, Any], key: str | None = None) -> OutgoingMessage:
    """Encode a control envelope (end-of-stream or stop)."""
    mid = new_id()
    doc = {"ts": WIRE_VERSION, "id": mid, "kind": "control", "created_at": time.time(), "body": body}
    return OutgoingMessage(dumps(doc), CONTROL_HEADERS, message_id=mid, key=key)


@dataclass(frozen=True, slots=True)
class Record:
    """The routing fields of a decoded record or control envelope, their types checked."""

    id: str
    kind: str
    to: str | list[str] | None
    src: str | None
    key: str | None
    body: Any
    group: int | None = None


def read_record(doc: dict[str, Any], message_id: str | None) -> Record:
    """Check and pick the fields a stage reads from an envelope document (a hostile one may hold anything).

    Raises:
        MalformedMessage: a field of the wrong type, naming it.
    """
    mid = doc.get("id") or message_id
    kind = doc.get("kind")
    headers = doc.get("headers") or {}
    key = doc.get("key")
    if not isinstance(mid, str) or not isinstance(kind, str) or not isinstance(headers, dict):
        raise MalformedMessage("malformed message: envelope id, kind or headers of the wrong type")
    if key is not None and not isinstance(key, str):
        raise MalformedMessage(f"malformed message: envelope key must be a string, not {type(key).__name__}")
    to = headers.get("to")
    if to is not None and not (isinstance(to, str) or (isinstance(to, list) and all(isinstance(t, str) for t in to))):
        raise MalformedMessage("malformed message: header 'to' must be a step name or a list of them")
    src = headers.get("src")
    if src is not None and not isinstance(src, str):
        raise MalformedMessage("malformed message: header 'src' must be a string")
    group = headers.get("g")
    if group is not None and (type(group) is not int or not 0 <= group < KEY_GROUPS):
        raise MalformedMessage(f"malformed message: header 'g' must be a key group (0-{KEY_GROUPS - 1})")
    return Record(mid, kind, to, src, key, doc.get("body"), group)


class Stop:
    """The ``Stop`` control message: ends the component consuming the queue it is sent to.

    A stage replica that gets it flushes its windows, sends end-of-stream downstream and exits; a
    :class:`~taskstream.stream_ops.sources.QueueSource` ends its source (so the whole pipeline winds down).
    """

    body = {"control": "stop"}

    @classmethod
    def message(cls, key: str | None = None) -> OutgoingMessage:
        return control_message(dict(cls.body), key=key)


async def send_stop(broker: Broker, queue: str, *, key: str | None = None) -> None:
    """Put a ``Stop`` on ``queue`` (``key`` is the message group on FIFO queues)."""
    message = Stop.message(key)
    await broker.publish(queue, message.body, headers=message.headers, message_id=message.message_id, key=key)
