"""The blob format: raw buffers for bytes and arrays, everything else as in the inline codec."""

from __future__ import annotations

import numpy as np
import pytest

from taskstream.errors import MalformedMessage
from taskstream.messages import Envelope, encode
from taskstream.payloads import decode_blob, encode_blob


def test_arrays_and_bytes_round_trip_as_raw_buffers() -> None:
    points = np.random.default_rng(1).random((1000, 2))
    codes = np.arange(1000, dtype=np.int32).reshape(10, 100)[:, ::2]  # not contiguous
    env = Envelope(
        kind="task",
        key="k1",
        correlation_id="c1",
        headers={"a": 1},
        body={"points": points, "codes": codes, "raw": b"\x00\x01\xff", "n": 7, "nested": [np.float32(1.5), "x"]},
    )
    back = decode_blob(encode_blob(env))
    assert back.id == env.id and back.kind == "task" and back.key == "k1" and back.correlation_id == "c1"
    assert back.headers == {"a": 1}
    assert np.array_equal(back.body["points"], points) and back.body["points"].dtype == np.float64
    assert np.array_equal(back.body["codes"], codes) and back.body["codes"].dtype == np.int32
    assert back.body["raw"] == b"\x00\x01\xff"
    assert back.body["n"] == 7 and back.body["nested"] == [1.5, "x"]
    back.body["points"][0, 0] = -1.0  # decoded arrays are writable copies


def test_blob_is_smaller_than_base64_json() -> None:
    env = Envelope(body=np.random.default_rng(2).random((50_000, 2)))
    blob, inline = encode_blob(env), encode(env)
    assert len(blob) < 800_000 + 400  # 50,000 x 2 x 8 bytes plus a small header
    assert len(inline) > len(blob) * 1.3  # base64 is 4/3 of the raw bytes


@pytest.mark.parametrize(
    "value",
    [np.zeros((0, 3)), np.array(5.0), np.array([True, False]), np.array(["2024-01-01"], dtype="datetime64[D]")],
    ids=["empty", "0-d", "bool", "datetime64"],
)
def test_unusual_arrays_round_trip(value: np.ndarray) -> None:  # type: ignore[type-arg]
    back = decode_blob(encode_blob(Envelope(body=value))).body
    assert back.shape == value.shape and back.dtype == value.dtype and np.array_equal(back, value)


def test_a_plain_json_envelope_is_accepted_as_a_blob() -> None:
    env = Envelope(body={"x": [1, 2]})
    assert decode_blob(encode(env)).body == {"x": [1, 2]}


def test_object_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="dtype=object"):
        encode_blob(Envelope(body=np.array([object()], dtype=object)))


def test_truncated_and_garbled_blobs_are_malformed() -> None:
    blob = encode_blob(Envelope(body=b"x" * 100))
    with pytest.raises(MalformedMessage, match="header describes"):
        decode_blob(blob[:-10])
    with pytest.raises(MalformedMessage, match="blob header"):
        decode_blob(blob[:6])
    garbled = blob[:8] + b"[" + blob[9:]
    with pytest.raises(MalformedMessage):
        decode_blob(garbled)
