"""The blob format of an offloaded envelope: JSON metadata plus raw buffers (``tsb1``).

Inline messages carry ``bytes`` and numpy arrays base64-encoded inside JSON (see :mod:`taskstream.messages`).
A blob has no such constraint, so large binary values travel as they are::

    b"TSB1" | uint32 little-endian n | n bytes of JSON | buffer 0 | buffer 1 | ...

The JSON is ``{"envelope": <the envelope document>, "buffers": [len0, len1, ...]}``, where every ``bytes``
value is ``{"__ts__": "bytes", "buf": i}`` and every array is
``{"__ts__": "ndarray", "dtype": "<f8", "shape": [...], "buf": i}`` (C order). For 400,000 2-D float64
points this is 6.4 MB instead of 8.5 MB, and decoding is a copy instead of a base64 pass over the text
(about 1 ms instead of 30 ms measured on the development machine).

Decoding never runs code from the blob: dtypes with Python objects are refused, as inline.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from taskstream.errors import MalformedMessage
from taskstream.messages import (
    MAX_DEPTH,
    WIRE_VERSION,
    Envelope,
    decode,
    envelope_document,
    loads,
    rebuild,
    restore_binary,
    short_errors,
)

__all__ = ["MAGIC", "decode_blob", "encode_blob"]

MAGIC = b"TSB1"
TAG = "__ts__"
_HEADER = struct.Struct("<4sI")


def encode_blob(envelope: Envelope) -> bytes:
    """Encode ``envelope`` in the blob format, bytes and arrays as raw buffers.

    Raises:
        TypeError: a value that no taskstream encoding covers (as :func:`taskstream.messages.dumps`).
    """
    buffers: list[bytes | bytearray | memoryview] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, bytes | bytearray | memoryview):
            buffers.append(bytes(obj) if isinstance(obj, memoryview) else obj)
            return {TAG: "bytes", "buf": len(buffers) - 1}
        module = type(obj).__module__
        if module == "numpy" and type(obj).__name__ == "ndarray":
            if obj.dtype.hasobject:
                raise TypeError("numpy arrays of dtype=object cannot travel (they would need pickle)")
            import numpy as np

            array = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)  # (ascontiguousarray makes 0-d 1-d)
            buffers.append(array.reshape(-1).view(np.uint8).data)
            return {TAG: "ndarray", "dtype": array.dtype.str, "shape": list(array.shape), "buf": len(buffers) - 1}
        if module == "numpy":
            return obj.item()
        if isinstance(obj, BaseModel):
            return obj.model_dump()
        if isinstance(obj, set | frozenset):
            return list(obj)
        raise TypeError(f"cannot encode a value of type {type(obj).__qualname__} in a taskstream message")

    try:
        envelope_json = orjson.dumps(envelope_document(envelope), default=default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        cause = exc.__cause__  # orjson keeps what ``default`` raised here; its message says more
        raise TypeError(str(cause) if isinstance(cause, TypeError) else str(exc)) from exc
    header = b'{"envelope":' + envelope_json + b',"buffers":' + orjson.dumps([len(b) for b in buffers]) + b"}"
    return b"".join([_HEADER.pack(MAGIC, len(header)), header, *buffers])


def decode_blob(data: bytes, *, message_id: str | None = None) -> Envelope:
    """Decode a blob made by :func:`encode_blob` (a plain JSON envelope is accepted too).

    Raises:
        MalformedMessage: the bytes are not a blob this version reads.
    """
    if not data.startswith(MAGIC):
        return decode(data, message_id=message_id)
    view = memoryview(data)
    try:
        _, length = _HEADER.unpack_from(view)
        header = orjson.loads(view[_HEADER.size : _HEADER.size + length])
        sizes = [int(n) for n in header["buffers"]]
        doc = header["envelope"]
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"broken payload blob header: {exc}") from exc
    offset = _HEADER.size + length
    buffers: list[memoryview] = []
    for size in sizes:
        buffers.append(view[offset : offset + size])
        offset += size
    if offset != len(data):
        raise MalformedMessage(f"payload blob is {len(data)} bytes, its header describes {offset}")
    doc = _restore(doc, buffers)
    if not (isinstance(doc, dict) and doc.get("ts") == WIRE_VERSION and "kind" in doc):
        raise MalformedMessage("payload blob does not hold a taskstream envelope")
    try:
        return Envelope.model_validate(doc)
    except PydanticValidationError as exc:
        raise MalformedMessage(f"broken taskstream envelope in payload blob: {short_errors(exc)}") from exc


def _restore(value: Any, buffers: list[memoryview]) -> Any:
    def restore_tag(tag: str, obj: dict[str, Any]) -> Any:
        if "buf" in obj:
            return _restore_buffer(tag, obj, buffers)
        return loads(orjson.dumps(obj))  # an inline-encoded value: the message codec restores it

    return rebuild(value, restore_tag, MAX_DEPTH)


def _restore_buffer(tag: str, value: dict[str, Any], buffers: list[memoryview]) -> Any:
    try:
        raw = buffers[int(value["buf"])]
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise MalformedMessage(f"broken {tag!r} value in payload blob: no buffer {value.get('buf')!r}") from exc
    return restore_binary(tag, raw, value, "payload blob")
