"""A bounded property-based fuzz of the decoders: whatever bytes or JSON-ish document arrives, decoding returns a
value or raises :class:`~taskstream.errors.MalformedMessage`, and the intake never raises at all.

Bounded (``max_examples``) so it runs in a few seconds in the normal test run; no example database is written.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import MalformedMessage
from taskstream.intake import Intake, Opened, Refused
from taskstream.messages import decode, loads
from taskstream.payloads import ClaimCheck
from taskstream.payloads.codec import MAGIC, decode_blob

pytestmark = pytest.mark.memory

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
TAGS = st.sampled_from(["bytes", "ndarray", "pickle", "", "buf"])
DTYPES = st.sampled_from(["<f8", "|O", "<i4", "V8", "O", "<U3", "bogus", "|b1"]) | st.text(max_size=6)
KINDS = st.sampled_from(["task", "result", "record", "control", "raw", "alien"]) | SCALARS


def _tagged(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``{"__ts__": ...}`` objects, well-formed or not."""
    return st.fixed_dictionaries(
        {"__ts__": TAGS},
        optional={
            "b64": st.text(alphabet="AQgw+/=!", max_size=24) | children,
            "dtype": DTYPES | children,
            "shape": st.lists(st.integers(-2, 5), max_size=3) | children,
            "buf": st.integers(-1, 3) | children,
        },
    )


def _envelopes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Envelope-looking objects with fields of any type."""
    return st.fixed_dictionaries(
        {"ts": st.just(1), "kind": KINDS},
        optional={
            "id": SCALARS | children,
            "headers": children,
            "body": children,
            "created_at": SCALARS,
            "correlation_id": SCALARS,
            "reply_to": SCALARS,
            "key": SCALARS,
            "deadline": SCALARS,
        },
    )


DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | _tagged(children)
        | _envelopes(children)
    ),
    max_leaves=25,
)


def _nested(depth: int, inner: Any) -> bytes:
    return b"[" * depth + json.dumps(inner).encode() + b"]" * depth


def _blob(header: Any, buffers: bytes, length_delta: int) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", max(0, len(raw) + length_delta)) + raw + buffers


WIRE = (
    st.binary(max_size=300)
    | DOCUMENTS.map(lambda doc: json.dumps(doc).encode())
    | st.builds(_nested, st.integers(0, 1100), DOCUMENTS)
    | st.text(max_size=60).map(lambda text: text.encode("utf-8", "surrogatepass"))
)
BLOBS = WIRE | st.builds(
    _blob,
    st.fixed_dictionaries({"envelope": DOCUMENTS, "buffers": st.lists(st.integers(-1, 16), max_size=3) | DOCUMENTS}),
    st.binary(max_size=32),
    st.integers(-3, 3),
)


def _value_or_malformed(decoder: Callable[[bytes], Any], data: bytes) -> None:
    try:
        decoder(data)
    except MalformedMessage:
        pass


@FUZZ
@given(WIRE)
def test_loads_returns_a_value_or_raises_malformed_message(data: bytes) -> None:
    _value_or_malformed(loads, data)


@FUZZ
@given(WIRE)
def test_decode_returns_an_envelope_or_raises_malformed_message(data: bytes) -> None:
    _value_or_malformed(decode, data)


@FUZZ
@given(BLOBS)
def test_decode_blob_returns_an_envelope_or_raises_malformed_message(data: bytes) -> None:
    _value_or_malformed(decode_blob, data)


def test_intake_read_and_decode_never_raise_on_the_memory_broker() -> None:
    loop = asyncio.new_event_loop()
    broker = MemoryBroker(f"fuzz-{uuid.uuid4().hex[:8]}", max_message_bytes=64 * 1024)
    loop.run_until_complete(broker.connect())
    loop.run_until_complete(broker.declare("fuzz"))
    subscription = broker.consume("fuzz", prefetch=1)
    intake = Intake(broker, "fuzz", claim_check=ClaimCheck.disabled(), max_bytes=4096)

    async def roundtrip(data: bytes) -> None:
        await broker.publish("fuzz", data)
        delivery = await subscription.__anext__()
        read = await intake.read(delivery)
        assert isinstance(read, Opened | Refused)
        decoded = await intake.decode(delivery)
        assert isinstance(decoded, Opened | Refused)
        if isinstance(decoded, Opened):
            assert decoded.envelope is not None
        else:
            assert decoded.reason
        await delivery.ack()

    @FUZZ
    @given(BLOBS)
    def check(data: bytes) -> None:
        loop.run_until_complete(asyncio.wait_for(roundtrip(data), 10))

    try:
        check()
    finally:
        loop.run_until_complete(subscription.close())
        loop.run_until_complete(broker.close())
        loop.close()
