"""How a taskstream message travels as an SQS message, and how any SQS message is read back.

SQS allows 10 message attributes, so taskstream's id, headers, key and body encoding travel packed in ONE
String attribute named ``taskstream``, a compact JSON object with single-letter keys (the wire format; keep
it compatible)::

    {"id": "<message id>", "h": {...headers...}, "k": "<key>", "e": "b64"}

``h``, ``k`` and ``e`` are left out when empty. The body is the message body as UTF-8 text when it is text SQS
can carry, else its base64 (and ``e`` says so). Messages of plain producers have no such attribute: their
String and Number attributes become headers (Binary ones as base64 text) and the body is their text.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from taskstream.brokers.base import OutgoingMessage
from taskstream.brokers.sqs.config import DEFAULT_GROUP, SQS_MAX_DELAY
from taskstream.errors import ConfigurationError, MessageTooLarge, NotSupported
from taskstream.messages import new_id

__all__ = ["ATTRIBUTE", "QueueInfo", "decode_message", "encode_entry", "sqs_id"]

#: The one message attribute that carries taskstream's id, headers, key and body encoding.
ATTRIBUTE = "taskstream"

_SQS_ID = re.compile(r"^[!-~]{1,128}$")  # group and deduplication ids: printable ASCII, no spaces
# Characters an SQS body may hold (XML 1.0 minus CR, which some paths normalise); anything else goes base64.
_NOT_SQS_TEXT = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(slots=True)
class QueueInfo:
    """What the broker caches about one queue after looking it up."""

    name: str  # the taskstream name
    sqs_name: str
    url: str
    fifo: bool
    max_bytes: int
    arn: str
    redrive: str | None


def sqs_id(value: str) -> str:
    """A valid group / deduplication id: ``value`` itself when SQS accepts it, else its SHA-256."""
    if _SQS_ID.match(value):
        return value
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def encode_entry(info: QueueInfo, message: OutgoingMessage, limit: int) -> tuple[dict[str, Any], int]:
    """One SendMessage(Batch) entry for ``message`` and its size as SQS counts it.

    Args:
        info: the target queue.
        message: what to send.
        limit: the largest body accepted (``Capabilities.max_message_bytes``).

    Raises:
        MessageTooLarge: the body is over ``limit``, or body, base64 and attribute are over the queue's limit.
        ConfigurationError: headers that are not JSON-compatible, or a delay SQS does not take.
        NotSupported: a delay on a FIFO queue.
    """
    body = message.body
    if len(body) > limit:
        raise MessageTooLarge(len(body), limit, "sqs")
    packed: dict[str, Any] = {"id": message.message_id or new_id()}  # "id": the message id
    if message.headers:
        packed["h"] = dict(message.headers)  # "h": the headers
    if message.key is not None:
        packed["k"] = message.key  # "k": the message key (FIFO group)
    text: str | None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or _NOT_SQS_TEXT.search(text):
        text = base64.b64encode(body).decode("ascii")
        packed["e"] = "b64"  # "e": the body's encoding; absent means UTF-8 text as is
    try:
        attribute = orjson.dumps(packed).decode()
    except TypeError as exc:
        raise ConfigurationError(f"message headers must be JSON-compatible: {exc}") from None
    size = len(text.encode("utf-8")) + len(ATTRIBUTE) + len("String") + len(attribute.encode("utf-8"))
    if size > info.max_bytes:
        raise MessageTooLarge(size, info.max_bytes, f"SQS queue {info.sqs_name!r} (body, base64 and headers)")
    entry: dict[str, Any] = {
        "MessageBody": text,
        "MessageAttributes": {ATTRIBUTE: {"DataType": "String", "StringValue": attribute}},
    }
    if info.fifo:
        if message.delay:
            raise NotSupported(f"SQS FIFO queue {info.name!r} has no per-message delay (publish without delay=)")
        entry["MessageGroupId"] = sqs_id(message.key) if message.key is not None else DEFAULT_GROUP
        entry["MessageDeduplicationId"] = sqs_id(packed["id"])
    elif message.delay:
        if not 0 <= message.delay <= SQS_MAX_DELAY:
            raise ConfigurationError(f"SQS delays are 0 to {SQS_MAX_DELAY} s, got {message.delay}")
        entry["DelaySeconds"] = math.ceil(message.delay)
    return entry, size


def decode_message(info: QueueInfo, raw: Mapping[str, Any]) -> tuple[bytes, dict[str, Any], str, str | None]:
    """Body, headers, message id and key of one received SQS message (ours or a plain producer's)."""
    attributes: Mapping[str, Any] = raw.get("MessageAttributes") or {}
    headers: dict[str, Any] = {}
    packed: dict[str, Any] = {}
    for name, value in attributes.items():
        data_type = str(value.get("DataType", "String"))
        if name == ATTRIBUTE and data_type == "String":
            loaded = orjson.loads(value.get("StringValue", "{}"))
            packed = loaded if isinstance(loaded, dict) else {}
        elif data_type.startswith("Number"):
            headers[name] = _number(str(value.get("StringValue", "0")))
        elif data_type.startswith("Binary"):
            headers[name] = base64.b64encode(bytes(value.get("BinaryValue", b""))).decode("ascii")
        else:
            headers[name] = value.get("StringValue", "")
    own = packed.get("h")  # "h": taskstream's headers
    if isinstance(own, dict):
        headers.update(own)
    text = str(raw.get("Body", ""))
    body = base64.b64decode(text) if packed.get("e") == "b64" else text.encode("utf-8")  # "e": body encoding
    message_id = str(packed.get("id") or raw["MessageId"])  # "id": taskstream's message id
    key = packed.get("k")  # "k": the message key
    if not packed and info.fifo:
        group = raw.get("Attributes", {}).get("MessageGroupId")  # a plain FIFO producer's group is its key
        key = str(group) if group is not None else None
    return body, headers, message_id, key if key is None else str(key)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)
