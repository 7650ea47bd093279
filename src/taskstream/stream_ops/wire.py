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

Large records travel by reference (claim-check, :mod:`taskstream.payloads`), as task arguments do: whoever
publishes records (stage outputs, dead letters, ``QueueSink``) passes them through
:meth:`Producer.offload_outgoing <taskstream.producer.Producer.offload_outgoing>`; whoever reads them (stage
replicas, ``QueueSource``) resolves a reference with :func:`open_record` and releases the blob after the final
ack. A record that is dead-lettered keeps its reference, so its payload stays. Small records pay one prefix
comparison per message.
"""

from __future__ import annotations

import time
from typing import Any

from taskstream.brokers.base import Broker, Delivery, OutgoingMessage
from taskstream.messages import CONTENT_TYPE, WIRE_VERSION, dumps, new_id
from taskstream.payloads.claimcheck import ClaimCheck, PayloadRef
from taskstream.settings import DEFAULT_MAX_ATTEMPTS

__all__ = ["Stop", "control_message", "open_record", "record_message", "retry_later", "send_stop"]

#: first pause before a delivery whose payload store failed comes back (doubles per attempt, at most 60 s)
STORE_RETRY_DELAY = 0.5

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


async def open_record(check: ClaimCheck, body: bytes, message_id: str) -> tuple[Any, PayloadRef]:
    """Resolve a payload reference (``is_reference(body)``) into what ``loads`` gives for inline bytes.

    Returns:
        the envelope document (``ts``, ``id``, ``kind``, ``headers``, ``key``, ``body``) or, for a foreign
        message, its JSON value; and the reference, to release once the delivery is acked for good.

    Raises:
        MessageError: the payload is missing or corrupt, or does not decode (dead-letter with
            :func:`~taskstream.payloads.claimcheck.open_failure_reason`).
        PayloadStoreError: the store failed (transient: :func:`retry_later`).
    """
    envelope, ref = await check.open(body, message_id=message_id)
    assert ref is not None, "open_record is for payload references"
    if envelope.kind == "raw":
        return envelope.body, ref
    doc: dict[str, Any] = {
        "ts": WIRE_VERSION,
        "id": envelope.id,
        "kind": envelope.kind,
        "headers": envelope.headers,
        "body": envelope.body,
    }
    if envelope.key is not None:
        doc["key"] = envelope.key
    return doc, ref


async def retry_later(delivery: Delivery, reason: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> str | None:
    """Requeue a delivery whose payload store failed, after a pause that doubles per attempt.

    Returns:
        ``None`` when it was requeued; the dead-letter reason once it has had ``max_attempts`` deliveries.
    """
    if delivery.attempt >= max_attempts:
        return f"failed {delivery.attempt} times (max_attempts={max_attempts}); last error: {reason}"
    await delivery.nack(requeue=True, delay=min(60.0, STORE_RETRY_DELAY * 2 ** (delivery.attempt - 1)))
    return None


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
