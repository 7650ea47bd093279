"""The envelope codec: JSON values, bytes, numpy arrays, raw foreign messages, garbage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import BaseModel

from taskstream.errors import MalformedMessage
from taskstream.messages import Envelope, decode, dumps, encode, loads


def test_envelope_roundtrip_keeps_every_field() -> None:
    env = Envelope(
        kind="task",
        body={"n": 3},
        headers={"trace": "abc"},
        correlation_id="c",
        reply_to="r",
        key="k",
        event_time=12.5,
        deadline=99.0,
    )
    back = decode(encode(env))
    assert back == env


def test_bytes_and_nested_bytes_roundtrip() -> None:
    value = {"blob": b"\x00\x01\xff", "list": [b"a", {"deep": b"b"}]}
    assert loads(dumps(value)) == value


def test_numpy_array_roundtrip_keeps_dtype_and_shape() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # non-contiguous view
    back = loads(dumps({"a": array}))["a"]
    assert back.dtype == np.float32
    assert back.shape == (3, 2)
    assert np.array_equal(back, array)


def test_zero_dimensional_array_keeps_its_shape() -> None:
    back = loads(dumps(np.array(3.5)))
    assert back.shape == ()
    assert back == 3.5


def test_numpy_object_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="dtype=object"):
        dumps(np.array([object()], dtype=object))


def test_pydantic_models_and_dataclasses_encode_as_objects() -> None:
    class Model(BaseModel):
        x: int

    @dataclasses.dataclass
    class Point:
        y: float

    assert loads(dumps([Model(x=1), Point(y=2.0)])) == [{"x": 1}, {"y": 2.0}]


def test_unencodable_value_says_which_type() -> None:
    with pytest.raises(TypeError, match="object"):
        dumps(object())


def test_raw_json_from_a_foreign_producer_becomes_a_raw_envelope() -> None:
    env = decode(b'{"temperature": 21.5}', message_id="foreign-1")
    assert env.kind == "raw"
    assert env.body == {"temperature": 21.5}
    assert env.id == "foreign-1"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x00\xff garbage", "not valid JSON"),
        (b'{"ts": 1, "kind": "nonsense", "id": "x"}', "kind"),
        (b'{"__ts__": "bytes", "b64": "!!!"}', "broken 'bytes'"),
        (b'{"__ts__": "pickle", "b64": "AAAA"}', "unknown encoded value type"),
    ],
)
def test_garbage_raises_one_clear_error_type(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedMessage, match=fragment):
        decode(data)
