"""The message envelope and its wire codec.

Every taskstream message is an :class:`Envelope` encoded as one JSON object with orjson::

    {"ts": 1, "id": "...", "kind": "task", "headers": {...}, "body": ..., ...}

The ``"ts": 1`` field marks a taskstream envelope (wire version 1). Anything else that parses as JSON is a
*raw* message from a foreign producer: it is wrapped as ``Envelope(kind="raw", body=<the JSON value>)`` so a
plain client can feed a taskstream consumer.

Body encodings (explicit, documented, no pickle):

=================  ===============================================================================
Python value       On the wire
=================  ===============================================================================
JSON types         as JSON (``None``, bool, int, float, str, list, dict with str keys)
``bytes``          ``{"__ts__": "bytes", "b64": "<base64>"}``
``numpy.ndarray``  ``{"__ts__": "ndarray", "dtype": "<f8", "shape": [..], "b64": "<raw C-order bytes>"}``
pydantic model     its ``model_dump()`` (decoded back as a dict; handlers re-validate by annotation)
dataclass          its fields as a JSON object
datetime / UUID    ISO 8601 string / string (orjson's native forms)
=================  ===============================================================================

Decoding never runs code from the message. Bytes that are not JSON, or an envelope with wrong fields,
raise :class:`~taskstream.errors.MalformedMessage`, which the consumer runtime dead-letters with the reason.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from taskstream.errors import MalformedMessage

__all__ = [
    "CONTENT_TYPE",
    "Envelope",
    "Kind",
    "MAX_DEPTH",
    "WIRE_VERSION",
    "decode",
    "decode_value",
    "dumps",
    "encode",
    "encode_value",
    "envelope_document",
    "header_str",
    "is_envelope_document",
    "loads",
    "new_id",
    "rebuild",
    "restore_binary",
    "short_errors",
]

WIRE_VERSION = 1
#: deepest nesting of lists and objects a message may have (orjson parses up to 1024, Python's own recursion
#: and orjson's encoder stop near 255; a body this deep cannot be re-published, so it is refused on intake)
MAX_DEPTH = 128
CONTENT_TYPE = "application/vnd.taskstream+json"
TAG = "__ts__"

Kind = Literal["task", "result", "record", "control", "raw", "bundle"]


def new_id() -> str:
    """A new random message id (32 hex characters)."""
    return uuid.uuid4().hex


class Envelope(BaseModel):
    """One message: routing metadata plus a body.

    Example:
        >>> env = Envelope(kind="record", body={"t": 21.5})
        >>> Envelope.from_bytes(env.to_bytes()).body
        {'t': 21.5}
    """

    model_config = ConfigDict(frozen=False, extra="ignore")

    id: str = Field(default_factory=new_id)
    kind: Kind = "record"
    headers: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    key: str | None = None
    event_time: float | None = None
    created_at: float = Field(default_factory=time.time)
    deadline: float | None = None
    body: Any = None

    def to_bytes(self) -> bytes:
        """Encode to the wire format."""
        return encode(self)

    @classmethod
    def from_bytes(cls, data: bytes, *, message_id: str | None = None) -> Envelope:
        """Decode wire bytes; raw JSON from a foreign producer becomes ``kind="raw"``."""
        return decode(data, message_id=message_id)


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return {TAG: "bytes", "b64": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    module = type(obj).__module__
    if module == "numpy" and type(obj).__name__ == "ndarray":
        return _encode_ndarray(obj)
    if module == "numpy":  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot encode a value of type {type(obj).__qualname__} in a taskstream message")


def _encode_ndarray(array: Any) -> dict[str, Any]:
    if array.dtype.hasobject:
        raise TypeError("numpy arrays of dtype=object cannot travel (they would need pickle)")
    return {
        TAG: "ndarray",
        "dtype": array.dtype.str,
        "shape": list(array.shape),  # 0-d arrays keep shape []
        "b64": base64.b64encode(array.tobytes(order="C")).decode("ascii"),
    }


def dumps(value: Any) -> bytes:
    """Encode any supported value (see the module table) to JSON bytes."""
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        raise TypeError(str(exc.__cause__ or exc)) from exc


def rebuild(value: Any, restore_tag: Callable[[str, dict[str, Any]], Any] | None, max_depth: int) -> Any:
    """Check the nesting depth of a decoded JSON value and rebuild its tagged values, without recursion.

    ``restore_tag(tag, obj)`` replaces each ``{"__ts__": tag, ...}`` object (``None``: leave them as they are).
    The value is changed in place (it is fresh from the JSON parser) and returned.

    Raises:
        MalformedMessage: the value nests deeper than ``max_depth`` containers.
    """
    if type(value) is dict and restore_tag is not None and isinstance(value.get(TAG), str):
        return restore_tag(value[TAG], value)
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise MalformedMessage(f"message nests deeper than {max_depth} levels (the limit; MAX_DEPTH)")
        items: Iterable[tuple[Any, Any]]
        if type(node) is dict:
            items = list(node.items())
        elif type(node) is list:
            items = enumerate(node)
        else:
            continue
        for index, child in items:
            kind = type(child)
            if kind is dict:
                if restore_tag is not None and isinstance(child.get(TAG), str):
                    node[index] = restore_tag(child[TAG], child)
                else:
                    stack.append((child, depth + 1))
            elif kind is list:
                stack.append((child, depth + 1))
    return value


_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')  # deleted before the depth is counted
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_COUNT_BELOW = 8192  # shorter texts first count their brackets (fewer than the limit: shallow, nothing more to do)


def _text_depth(data: bytes, max_depth: int) -> int | None:
    """The nesting depth of valid JSON text counted on the raw bytes at C speed, or None when it cannot tell.

    Escaped backslashes and quotes are dropped, then every byte but quotes and brackets; each string is then an
    empty ``""`` pair unless it held brackets (then None: the caller walks the parsed value instead). What is left
    is the structure's brackets, and each pass of removing the innermost ``[]`` pairs takes off exactly one level.
    Past ``max_depth`` passes the answer is ``max_depth + 1`` (too deep, whatever the exact depth).
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in text:
        return None
    text = text.translate(_BRACKETS)
    for depth in range(max_depth + 1):
        if not text:
            return depth
        text = text.replace(b"[]", b"")
    return max_depth + 1


def _needs_walk(data: bytes | str, max_depth: int) -> tuple[bool, bool]:
    """(may be deeper than ``max_depth``, may hold tagged values), from a cheap scan of the raw text.

    A text with few brackets is shallow; one with many (a record batch) has its depth counted by
    :func:`_text_depth`, and only a text deeper than ``max_depth`` (or with brackets inside strings) is walked.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    tagged = b'"__ts__"' in raw
    if len(raw) <= max_depth or (len(raw) < _COUNT_BELOW and raw.count(b"[") + raw.count(b"{") <= max_depth):
        return False, tagged
    depth = _text_depth(raw, max_depth)
    return depth is None or depth > max_depth, tagged


def _restore_tagged(tag: str, value: dict[str, Any]) -> Any:
    try:
        raw = base64.b64decode(value["b64"], validate=True)
    except Exception as exc:
        raise MalformedMessage(f"broken {tag!r} value in message body: {exc}") from exc
    return restore_binary(tag, raw, value, "message body")


def restore_binary(tag: str, raw: bytes | memoryview, value: Mapping[str, Any], where: str) -> Any:
    """Rebuild a tagged ``bytes`` or ``ndarray`` value from its raw bytes.

    Shared by the inline codec (base64 in JSON) and the payload blob codec (raw buffers); ``where`` names the
    container in error messages.

    Raises:
        MalformedMessage: unknown tag, missing numpy, an object dtype, or a shape that does not fit the bytes.
    """
    try:
        if tag == "bytes":
            return bytes(raw)
        if tag == "ndarray":
            try:
                import numpy as np
            except ImportError as exc:
                raise MalformedMessage(
                    f"{where} carries a numpy array but numpy is not installed: pip install 'taskstream[numpy]'"
                ) from exc
            dtype = np.dtype(value["dtype"])
            if dtype.hasobject:
                raise MalformedMessage("numpy arrays of dtype=object are refused")
            return np.frombuffer(raw, dtype=dtype).reshape(value["shape"]).copy()
    except MalformedMessage:
        raise
    except Exception as exc:
        raise MalformedMessage(f"broken {tag!r} value in {where}: {exc}") from exc
    raise MalformedMessage(f"unknown encoded value type {tag!r} in {where}")


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode JSON bytes produced by :func:`dumps`, restoring bytes and arrays.

    Raises:
        MalformedMessage: not JSON (or not UTF-8), a number out of range, nested deeper than ``max_depth``,
            or a broken tagged value.
    """
    if isinstance(data, memoryview | bytearray):
        data = bytes(data)
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        preview = data[:40] if isinstance(data, bytes) else data[:40].encode()
        raise MalformedMessage(f"message is not valid JSON ({exc}); first bytes: {preview!r}") from exc
    deep, tagged = _needs_walk(data, max_depth)
    if deep or tagged:
        return rebuild(parsed, _restore_tagged if tagged else None, max_depth)
    return parsed


def encode_value(value: Any) -> bytes:
    """Alias of :func:`dumps` for symmetry with :func:`decode_value`."""
    return dumps(value)


def decode_value(data: bytes) -> Any:
    """Alias of :func:`loads`."""
    return loads(data)


def encode(envelope: Envelope) -> bytes:
    """Encode an envelope to wire bytes."""
    return dumps(envelope_document(envelope))


def envelope_document(envelope: Envelope) -> dict[str, Any]:
    """The JSON object an envelope travels as (before encoding): fields left at ``None`` are left out."""
    doc: dict[str, Any] = {
        "ts": WIRE_VERSION,
        "id": envelope.id,
        "kind": envelope.kind,
        "created_at": envelope.created_at,
        "body": envelope.body,
    }
    if envelope.headers:
        doc["headers"] = envelope.headers
    for name in ("correlation_id", "reply_to", "key", "event_time", "deadline"):
        field = getattr(envelope, name)
        if field is not None:
            doc[name] = field
    return doc


def decode(data: bytes, *, message_id: str | None = None) -> Envelope:
    """Decode wire bytes into an Envelope.

    Raises:
        MalformedMessage: the bytes are not JSON, or look like an envelope but have broken fields.
    """
    parsed = loads(data)
    if is_envelope_document(parsed):
        try:
            return Envelope.model_validate(parsed)
        except PydanticValidationError as exc:
            raise MalformedMessage(f"broken taskstream envelope: {short_errors(exc)}") from exc
    return Envelope(id=message_id or new_id(), kind="raw", body=parsed)


def is_envelope_document(doc: Any) -> bool:
    """True when a decoded JSON value is a taskstream envelope (``"ts": 1`` and ``kind``), False for foreign JSON.

    A foreign document with other ``ts`` values (a sensor's timestamp, say) is foreign JSON, not an error.
    """
    return type(doc) is dict and doc.get("ts") == WIRE_VERSION and "kind" in doc


def short_errors(exc: Exception, root: str = "<root>") -> str:
    """The first three problems of a pydantic ``ValidationError`` as ``"loc: msg; ..."`` (``root`` names an empty
    location); any other exception as ``"Type: message"``.

    Example:
        >>> from pydantic import BaseModel
        >>> class M(BaseModel):
        ...     n: int
        >>> try:
        ...     M.model_validate({"n": "x"})
        ... except Exception as exc:
        ...     print(short_errors(exc))
        n: Input should be a valid integer, unable to parse string as an integer
    """
    if not isinstance(exc, PydanticValidationError):
        return f"{type(exc).__name__}: {exc}"
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or root
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def header_str(headers: Mapping[str, Any], name: str, default: str = "") -> str:
    """Read a header as a string, whatever type the broker gave it back as."""
    value = headers.get(name, default)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
