"""The Azure message frame: how a taskstream message travels as Azure queue message text.

Azure messages carry text only, with no headers. taskstream sends one compact JSON object (the wire format;
keep it compatible)::

    {"tsq":1,"id":"<message id>","b":"<base64 of the body bytes>","h":{...headers...},"k":"<key>"}

``tsq`` marks (and versions) the frame, ``b`` is the body, always base64 so any bytes survive, ``h`` the
headers and ``k`` the key (both left out when empty). Text that does not start with ``{"tsq":1,`` comes from a
foreign producer: its UTF-8 is the body (or its base64, with ``foreign_encoding=base64``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from taskstream.errors import MalformedMessage

__all__ = ["FRAME_PREFIX", "decode_frame", "encode_frame"]

#: How every taskstream frame starts: ``tsq`` is the frame version.
FRAME_PREFIX = '{"tsq":1,'


def encode_frame(body: bytes, headers: Mapping[str, Any] | None, message_id: str, key: str | None) -> str:
    """The message text taskstream sends for one message (see the module docstring for the keys).

    Raises:
        MalformedMessage: a header value is not JSON-compatible.
    """
    # "tsq": frame version, "id": message id, "b": base64 body, "h": headers, "k": key
    doc: dict[str, Any] = {"tsq": 1, "id": message_id, "b": base64.b64encode(body).decode("ascii")}
    if headers:
        doc["h"] = dict(headers)
    if key is not None:
        doc["k"] = key
    try:
        text = orjson.dumps(doc).decode("utf-8")
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise MalformedMessage(f"message headers must be JSON-compatible with string keys: {exc}") from exc
    if "\ufffe" in text or "\uffff" in text:  # not allowed in XML, which carries the text
        text = text.replace("\ufffe", "\\ufffe").replace("\uffff", "\\uffff")
    return text


def decode_frame(
    text: str, *, foreign_encoding: str = "text"
) -> tuple[bytes, dict[str, Any], str | None, str | None, str | None]:
    """Split received message text into ``(body, headers, message_id, key, error)``.

    Never raises: text that cannot be decoded comes back as its own UTF-8 bytes with ``error`` saying why, so
    the consumer runtime can dead-letter it with the reason.
    """
    raw = text.encode("utf-8", "surrogatepass")
    if text.startswith(FRAME_PREFIX):
        try:
            doc = orjson.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("b"), str):  # "b": the base64 body
                raise ValueError("no base64 body")
            body = base64.b64decode(doc["b"], validate=True)
        except (orjson.JSONDecodeError, ValueError, binascii.Error) as exc:
            return raw, {}, None, None, f"broken taskstream frame: {exc}"
        headers = doc.get("h")  # "h": headers
        message_id = doc.get("id")  # "id": message id
        key = doc.get("k")  # "k": key
        return (
            body,
            headers if isinstance(headers, dict) else {},
            message_id if isinstance(message_id, str) else None,
            key if isinstance(key, str) else None,
            None,
        )
    if foreign_encoding == "base64":
        try:
            return base64.b64decode(text, validate=True), {}, None, None, None
        except (binascii.Error, ValueError) as exc:
            return raw, {}, None, None, f"foreign message is not valid base64: {exc}"
    return raw, {}, None, None, None
