"""Joins of two keyed streams within windows (event time injected through the records)."""

from __future__ import annotations

from typing import Any

import pytest

from taskstream.errors import ConfigurationError
from taskstream.stream_ops import EventClock, Pipeline, RunConfig, SessionWindow, TumblingWindow

ORDERS = [
    {"user": "ann", "t": 0.2, "order": "o1"},
    {"user": "bob", "t": 0.4, "order": "o2"},
    {"user": "ann", "t": 1.3, "order": "o3"},
    {"user": "cid", "t": 2.1, "order": "o4"},
]
CLICKS = [
    {"user": "ann", "t": 0.1, "page": "p1"},
    {"user": "ann", "t": 0.7, "page": "p2"},
    {"user": "bob", "t": 1.1, "page": "p3"},  # bob's order was in [0,1): no match in an inner join
    {"user": "ann", "t": 1.9, "page": "p4"},
    {"user": "dan", "t": 2.2, "page": "p5"},
]


async def join(how: Any, orders: list[Any] = ORDERS, clicks: list[Any] = CLICKS) -> tuple[list[Any], list[Any]]:
    p = Pipeline(f"join-{how}")
    left = p.source("orders", orders).key_by(lambda o: o["user"])
    right = p.source("clicks", clicks).key_by(lambda c: c["user"])
    joined = left.join(right, TumblingWindow(1.0), EventClock("t", allowed_lateness=0.5), how=how)
    out, late = joined.collect(), joined.late.collect()
    await p.run(config=RunConfig(batch_size=2))
    pairs = sorted(
        (k, res["start"], res["left"] and res["left"]["order"], res["right"] and res["right"]["page"]) for k, res in out
    )
    return pairs, late


async def test_inner_join_pairs_records_of_the_same_key_and_window() -> None:
    pairs, late = await join("inner")
    assert pairs == [("ann", 0.0, "o1", "p1"), ("ann", 0.0, "o1", "p2"), ("ann", 1.0, "o3", "p4")]
    assert late == []


async def test_left_and_outer_joins_keep_unmatched_sides() -> None:
    pairs, _ = await join("left")
    assert ("bob", 0.0, "o2", None) in pairs and ("cid", 2.0, "o4", None) in pairs
    assert not any(k == "dan" for k, *_ in pairs)
    pairs, _ = await join("outer")
    assert ("dan", 2.0, None, "p5") in pairs and ("bob", 1.0, None, "p3") in pairs


async def test_late_records_of_either_side_leave_on_the_join_late_output() -> None:
    # Each late record follows, on its own side, a record that moves ann's watermark past 1.0, so it is late
    # however the two sources interleave.
    clicks = [*CLICKS, {"user": "ann", "t": 0.3, "page": "late"}]
    orders = [*ORDERS, {"user": "ann", "t": 3.0, "order": "o5"}, {"user": "ann", "t": 0.9, "order": "late"}]
    _, late = await join("inner", orders, clicks)
    got = {(k, v["side"], v["value"]["t"]) for k, v in late}
    assert {("ann", "left", 0.9), ("ann", "right", 0.3)} <= got  # others may be late too, by interleaving


async def test_join_in_session_windows() -> None:
    p = Pipeline("join-session")
    a = p.source("a", [{"k": "x", "t": 0.0}, {"k": "x", "t": 5.0}]).key_by(lambda r: r["k"])
    b = p.source("b", [{"k": "x", "t": 0.4}, {"k": "x", "t": 9.0}]).key_by(lambda r: r["k"])
    out = a.join(b, SessionWindow(1.0), EventClock("t", allowed_lateness=10.0)).collect()
    await p.run()
    assert [(res["left"]["t"], res["right"]["t"]) for _k, res in out] == [(0.0, 0.4)]


def test_join_needs_keyed_streams() -> None:
    p = Pipeline("join-bad")
    a = p.source("a", [1])
    b = p.source("b", [2]).key_by(str)
    with pytest.raises(ConfigurationError, match="key_by"):
        a.join(b, TumblingWindow(1.0))
    with pytest.raises(ConfigurationError, match="how"):
        b.join(b, TumblingWindow(1.0), how="cross")  # type: ignore[arg-type]


async def test_join_where_the_keying_is_unknown_takes_only_keyed_items() -> None:
    p = Pipeline("join-unknown")
    left = p.source("l", [("a", 1), "ab"]).map(lambda x: x)  # "ab" is not a keyed item
    right = p.source("r", [("a", 2), ["a", 3]]).map(lambda x: x)  # nor is a list
    pairs = left.join(right, TumblingWindow(60.0)).map_value(lambda r: (r["left"], r["right"])).collect()
    result = await p.run()
    assert pairs == [("a", (1, 2))]
    assert result.dead_lettered == 2
