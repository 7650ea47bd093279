"""How records and control messages travel between stages.

A record is a standard taskstream envelope (``kind="record"``); a keyed item ``(key, value)`` travels as
``key=key, body=value``. Two envelope headers route it: ``to`` (the step, or list of steps, receiving it downstream)
and ``src`` (``"<stage>/<replica>"`` of the sender, for end-of-stream accounting).

Control envelopes (``kind="control"``):

=========================================================  ==================================================
Body                                                       Meaning
=========================================================  ==================================================
``{"control": "eos", "from": "stage/replica", "sent": n}``  that upstream replica finished after sending ``n``
                                                           records to this queue
``{"control": "stop"}``                                    end this component now (flush, end-of-stream down)
=========================================================  ==================================================
"""

from __future__ import annotations

import time
from typing import Any

from taskstream.brokers.base import Broker, OutgoingMessage
from taskstream.messages import CONTENT_TYPE, WIRE_VERSION, dumps, new_id

__all__ = ["Stop", "control_message", "record_message", "send_stop"]

RECORD_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "record"}
CONTROL_HEADERS = {"content_type": CONTENT_TYPE, "ts_kind": "control"}


def record_message(item: Any, to: str | list[str], src: str, now: float) -> OutgoingMessage:
    """Encode one item for the stage queue of step ``to`` (or of several steps of that stage)."""
    mid = new_id()
    doc: dict[str, Any] = {
        "ts": WIRE_VERSION,
        "id": mid,
        "kind": "record",
        "created_at": now,
        "headers": {"to": to, "src": src},
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
