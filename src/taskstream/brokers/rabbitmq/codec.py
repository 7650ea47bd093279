"""AMQP properties and header tables: what taskstream's headers become on the wire and back.

``message_id``, ``correlation_id``, ``reply_to`` and ``content_type`` are native AMQP properties (the reserved
header names map onto them and back); the rest travels in the ``headers`` table, floats as 64-bit doubles.
Received values come back JSON-compatible (timestamps as epoch seconds, bytes as text).
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp import encode as pamqp_encode

from taskstream.messages import new_id

__all__ = [
    "ATTEMPT_HEADER",
    "DELAY_HEADER",
    "KEY_HEADER",
    "Properties",
    "Received",
    "delivery_tag",
    "json_value",
    "outgoing_properties",
    "read_received",
    "requeued_properties",
]

ATTEMPT_HEADER = "x-ts-attempt"  # attempts already made, carried by a requeued copy
KEY_HEADER = "x-ts-key"  # the message's partition key
DELAY_HEADER = "ts-delay-ms"  # routes to a delay bucket; headers exchanges ignore names starting with "x-"
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


def json_value(value: Any) -> Any:
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
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def delivery_tag(message: DeliveredMessage) -> int:
    """The delivery tag of a received message (0 if the frame has none)."""
    return int(message.delivery.delivery_tag or 0)  # type: ignore[union-attr]


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


class Properties(spec.Basic.Properties):
    """``Basic.Properties`` whose headers table keeps float values exact (encoded as doubles)."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers" and value:
            return _encode_table(value)
        return super().encode_property(name, value)


def outgoing_properties(
    headers: Mapping[str, Any] | None, message_id: str | None, key: str | None, delivery_mode: int
) -> spec.Basic.Properties:
    """The AMQP properties of a message taskstream publishes.

    Reserved names that fit a native property (a string of at most 255 characters) become that property; headers
    the server sets are dropped; ``key`` travels in the ``x-ts-key`` header.
    """
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
    return Properties(
        headers=table or None,
        delivery_mode=delivery_mode,
        message_id=message_id or new_id(),
        content_type=natives.get("content_type"),
        correlation_id=natives.get("correlation_id"),
        reply_to=natives.get("reply_to"),
    )


def requeued_properties(message: DeliveredMessage, attempts: int, delivery_mode: int) -> spec.Basic.Properties:
    """The properties of a received message's copy published back to its queue, carrying ``attempts``."""
    old = message.header.properties
    table = {k: v for k, v in (old.headers or {}).items() if k not in _SERVER_HEADERS}
    table[ATTEMPT_HEADER] = attempts
    return Properties(
        content_type=old.content_type,
        content_encoding=old.content_encoding,
        headers=table,
        delivery_mode=old.delivery_mode or delivery_mode,
        priority=old.priority,
        correlation_id=old.correlation_id,
        reply_to=old.reply_to,
        message_id=old.message_id or new_id(),
        timestamp=old.timestamp,
        message_type=old.message_type,
        app_id=old.app_id,
    )


class Received(NamedTuple):
    """What a received message's properties say: its headers, attempts made before this one, and key."""

    headers: dict[str, Any]
    prior: int
    key: Any


def read_received(message: DeliveredMessage) -> Received:
    """Read a received message's headers, native properties and attempt count.

    The attempts made before are ``x-ts-attempt`` (carried by requeued copies) plus the deliveries the broker
    itself retried: ``x-delivery-count`` on quorum queues, ``redelivered`` (counted as one) on classic queues.
    """
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
                key = json_value(value)
            elif name == "x-delivery-count":
                prior = _as_int(value)
            elif name == DELAY_HEADER:
                continue
            elif isinstance(value, str | int | float | bool):
                headers[name] = value
            else:
                headers[name] = json_value(value)
    if not prior and message.delivery.redelivered:  # type: ignore[union-attr]
        prior = 1
    if props.content_type is not None:
        headers["content_type"] = props.content_type
    if props.correlation_id is not None:
        headers["correlation_id"] = props.correlation_id
    if props.reply_to is not None:
        headers["reply_to"] = props.reply_to
    return Received(headers, given + prior, key)
