"""How records and control messages travel between stages.

A record is a standard taskstream envelope (``kind="record"``); a keyed item ``(key, value)`` travels as
``key=key, body=value``. Envelope headers route it: ``to`` (the step, or list of steps, receiving it downstream),
``src`` (``"<stage>/<replica>"`` of the sender) and ``g`` (the record's key group, :mod:`.keygroups`); the last
two are for end-of-stream accounting.

Control envelopes (``kind="control"``):

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
from dataclasses import dataclass
from typing import Any

from taskstream.brokers.base import Broker, OutgoingMessage
from taskstream.errors import MalformedMessage
from taskstream.messages import CONTENT_TYPE, WIRE_VERSION, dumps, new_id
from taskstream.stream_ops.keygroups import KEY_GROUPS

__all__ = ["Record", "Stop", "control_message", "read_record", "record_message", "send_stop"]

RECORD_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "record"}
CONTROL_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "control"}


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
