"""The depth limit of ``messages.loads`` on long texts (record batches): the bracket count on the raw bytes is
over the limit for any long batch, so the depth is counted on the text instead of walking the parsed value. It
must agree with the walk: nothing deeper than ``MAX_DEPTH`` gets through, and brackets, quotes and backslashes
inside strings never fool it."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskstream.errors import MalformedMessage
from taskstream.messages import MAX_DEPTH, _text_depth, loads

pytestmark = pytest.mark.memory


def depth_of(value: Any) -> int:
    """Containers nested, the top one counted as 1 (as ``loads`` counts them)."""
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


TRICKY = st.text(alphabet=st.sampled_from(list('ab[]{}"\\/\n\u00e9:,')), max_size=6)
VALUES = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, database=None)
@given(value=VALUES, limit=st.integers(min_value=1, max_value=8), ascii_only=st.booleans())
def test_text_depth_agrees_with_the_parsed_value(value: Any, limit: int, ascii_only: bool) -> None:
    for data in (orjson.dumps(value), json.dumps(value, ensure_ascii=ascii_only).encode()):
        counted = _text_depth(data, limit)
        if counted is None:  # brackets inside a string: loads walks the parsed value instead
            assert b'"' in data
            continue
        if depth_of(value) > limit:
            assert counted > limit
        else:
            assert counted == depth_of(value)


def batch(records: int, value: Any) -> bytes:
    body = [[f"id-{i}", "q", i % 128, f"s{i % 8}", value] for i in range(records)]
    return orjson.dumps({"ts": 1, "kind": "record", "id": "b", "body": body})


def test_a_long_flat_batch_decodes() -> None:
    data = batch(2000, {"sensor": "s1", "t": 1.5, "note": 'a "quoted" \\ back'})
    assert len(loads(data)["body"]) == 2000


@pytest.mark.parametrize("leaf", [1, "]]]]", '"[[[', "\\", {"__ts__": "bytes", "b64": "AA=="}])
def test_a_long_batch_with_one_record_too_deep_is_refused(leaf: Any) -> None:
    records = [[f"id-{i}", "q", 0, "k", i] for i in range(3000)]
    records.append(["deep", "q", 0, "k", nested(MAX_DEPTH, leaf)])
    data = orjson.dumps({"body": records})
    with pytest.raises(MalformedMessage, match="deeper than"):
        loads(data)
    with pytest.raises(MalformedMessage, match="deeper than"):
        loads(data.decode())


@pytest.mark.parametrize("leaf", [1, "]]]]", "[[[[", '\\"]'])
def test_a_long_batch_just_under_the_limit_is_read(leaf: Any) -> None:
    records = [[f"id-{i}", "q", 0, "k", i] for i in range(3000)]
    records.append(nested(MAX_DEPTH - 2, leaf))  # the top object and the list hold it: MAX_DEPTH in all
    data = orjson.dumps({"body": records})
    assert loads(data)["body"][-1] == records[-1]


def test_brackets_in_strings_do_not_hide_depth() -> None:
    # "]]]..." inside strings would cancel the opening brackets if strings were not set apart
    closing = "]" * (MAX_DEPTH + 5)
    records: list[Any] = [[closing] * 10 for _ in range(500)]
    records.append(nested(MAX_DEPTH + 1))
    with pytest.raises(MalformedMessage, match="deeper than"):
        loads(orjson.dumps(records))
