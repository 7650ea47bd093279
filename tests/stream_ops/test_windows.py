"""Windows with injected time: tumbling, sliding, session, lateness, processing time, snapshots."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from taskstream.brokers.memory import MemoryBroker
from taskstream.messages import loads
from taskstream.stream_ops import (
    Collect,
    Count,
    EventClock,
    ManualTime,
    Max,
    Mean,
    Min,
    Pipeline,
    RunConfig,
    SessionWindow,
    SlidingWindow,
    Sum,
    SystemClock,
    TumblingWindow,
)
from taskstream.stream_ops.aggregators import Named
from taskstream.stream_ops.windows.logic import WindowLogic, WindowSpec


def r(key: str, t: float, v: float = 1.0) -> dict[str, Any]:
    return {"k": key, "t": t, "v": v}


def windows_of(out: list[Any]) -> list[tuple[str, float, float, Any]]:
    return [
        (k, res["start"], res["end"], {n: x for n, x in res.items() if n not in ("key", "start", "end")})
        for k, res in out
    ]


async def run_window(
    records: list[dict[str, Any]], windower: Any, clock: Any, **aggs: Any
) -> tuple[list[Any], list[Any]]:
    p = Pipeline("win")
    w = p.source("in", records).key_by(lambda x: x["k"]).window(windower, clock).aggregate(**aggs)
    out, late = w.collect(), w.late.collect()
    await p.run(config=RunConfig(batch_size=2))  # small batches: results must not depend on batching
    return out, late


async def test_tumbling_event_time_with_allowed_lateness_and_late_side_output() -> None:
    records = [
        r("a", 0.1, 1),
        r("a", 0.9, 3),
        r("a", 1.2, 5),  # wm 0.7: [0,1) still open
        r("a", 0.95, 7),  # out of order but within lateness: joins [0,1)
        r("a", 1.6, 2),  # wm 1.1 closes [0,1)
        r("a", 0.5, 100),  # [0,1) is closed: late
        r("b", 0.2, 4),  # b has its own watermark: not late
        r("a", 2.7, 1),  # wm 2.2 closes [1,2)
    ]
    out, late = await run_window(
        records,
        TumblingWindow(1.0),
        EventClock("t", allowed_lateness=0.5),
        n=Count(),
        total=Sum("v"),
        lo=Min("v"),
        hi=Max("v"),
        avg=Mean("v"),
    )
    assert windows_of(out) == [
        ("a", 0.0, 1.0, {"n": 3, "total": 11, "lo": 1, "hi": 7, "avg": 11 / 3}),
        ("a", 1.0, 2.0, {"n": 2, "total": 7, "lo": 2, "hi": 5, "avg": 3.5}),
        ("a", 2.0, 3.0, {"n": 1, "total": 1, "lo": 1, "hi": 1, "avg": 1.0}),  # closed at end-of-stream
        ("b", 0.0, 1.0, {"n": 1, "total": 4, "lo": 4, "hi": 4, "avg": 4.0}),
    ]  # in the order they closed
    assert late == [("a", r("a", 0.5, 100))]


async def test_zero_lateness_marks_every_record_behind_a_closed_window_late() -> None:
    records = [r("a", 0.5), r("a", 1.5), r("a", 0.99), r("a", 1.0)]
    out, late = await run_window(records, TumblingWindow(1.0), EventClock("t"), n=Count())
    assert [(s, e, res["n"]) for s, e, res in ((x[1]["start"], x[1]["end"], x[1]) for x in out)] == [
        (0.0, 1.0, 1),
        (1.0, 2.0, 2),
    ]
    assert late == [("a", r("a", 0.99))]


async def test_sliding_windows_count_each_record_in_every_window_it_falls_in() -> None:
    records = [r("a", t) for t in (0.5, 1.5, 2.5, 3.5)]
    out, late = await run_window(records, SlidingWindow(2.0, 1.0), EventClock("t"), n=Count())
    got = sorted((x[1]["start"], x[1]["end"], x[1]["n"]) for x in out)
    assert got == [(-1.0, 1.0, 1), (0.0, 2.0, 2), (1.0, 3.0, 2), (2.0, 4.0, 2), (3.0, 5.0, 1)]
    assert late == []


async def test_session_windows_split_on_gaps_and_merge_when_bridged() -> None:
    records = [
        r("a", 0.0),
        r("a", 0.5),  # session 1
        r("a", 3.0),
        r("a", 4.2),  # gap 2.5 > 1.0 -> session 2 starts at 3.0 ... bridged below
        r("a", 3.6),  # bridges 3.0 and 4.2 (both within 1.0)
        r("a", 10.0),  # wm 10.0 closes session 2 (ends 4.2 + 1.0)
        r("a", 4.0),  # session 2 closed, 4.0 + 1.0 <= 10: late
        r("b", 0.0),
        r("b", 0.9),
        r("b", 1.8),  # chain of small gaps: one session
    ]
    clock = EventClock("t", allowed_lateness=1.0)
    out, late = await run_window(records, SessionWindow(1.0), clock, n=Count(), vs=Collect("t"))
    got = sorted((k, res["start"], res["end"], res["n"]) for k, res in out)
    assert got == [("a", 0.0, 1.5, 2), ("a", 3.0, 5.2, 3), ("a", 10.0, 11.0, 1), ("b", 0.0, 2.8, 3)]
    assert late == [("a", r("a", 4.0))]


async def test_session_windows_merge_two_open_sessions() -> None:
    records = [r("a", 0.0), r("a", 1.5), r("a", 0.8)]  # 0.8 joins both open sessions (gap 1.0)
    out, _late = await run_window(records, SessionWindow(1.0), EventClock("t", allowed_lateness=5.0), n=Count())
    assert [(res["start"], res["end"], res["n"]) for _k, res in out] == [(0.0, 2.5, 3)]


async def test_processing_time_windows_close_on_the_injected_clock() -> None:
    clock = ManualTime(1000.0)
    arrivals = [1000.1, 1000.4, 1000.9, 1001.2, 1001.3, 1002.6]

    def arrive(x: dict[str, Any]) -> dict[str, Any]:
        clock.set(arrivals[x["i"]])  # the clock moves as each record reaches the window, not ahead of it
        return x

    p = Pipeline("proc-time")
    w = (
        p.source("in", [{"k": "a", "i": i} for i in range(len(arrivals))])
        .map(arrive)
        .key_by(lambda x: x["k"])
        .window(TumblingWindow(1.0), SystemClock())
        .aggregate(n=Count(), items=Collect("i"))
    )
    out = w.collect()
    await p.run(now=clock, config=RunConfig(batch_size=1))
    got = [(res["start"], res["end"], res["items"]) for _k, res in out]
    assert got == [(1000.0, 1001.0, [0, 1, 2]), (1001.0, 1002.0, [3, 4]), (1002.0, 1003.0, [5])]


async def test_reduce_and_collect() -> None:
    p = Pipeline("reduce")
    keyed = p.source("in", [r("a", 0.1, 2), r("a", 0.2, 5), r("a", 1.5, 1)]).key_by(lambda x: x["k"])
    reduced = keyed.window(TumblingWindow(1.0), EventClock("t")).reduce(lambda a, b: a if a["v"] >= b["v"] else b)
    collected = keyed.window(TumblingWindow(1.0), EventClock("t")).collect("v")
    out_r, out_c = reduced.collect(), collected.collect()
    await p.run()
    assert [res["value"]["v"] for _k, res in out_r] == [5, 1]
    assert [res["values"] for _k, res in out_c] == [[2, 5], [1]]


async def test_late_records_without_a_late_sink_go_to_the_dead_letter_queue_counted() -> None:
    hub = f"late-{uuid.uuid4().hex[:6]}"
    p = Pipeline("late-dlq")
    records = [r("a", 0.5), r("a", 3.0), r("a", 0.1)]
    p.source("in", records).key_by(lambda x: x["k"]).window(TumblingWindow(1.0), EventClock("t")).aggregate(
        n=Count()
    ).collect()
    result = await p.run(MemoryBroker(hub))
    assert result.late == 1 and result.dead_lettered == 1
    reader = MemoryBroker(hub)
    await reader.connect()
    async with asyncio.timeout(5):
        delivery = await reader.consume(p.plan().dead_letter_queue).__anext__()
    assert "late record" in delivery.headers["x-death-reason"]
    assert loads(delivery.body)["item"] == ["a", r("a", 0.1)]


def test_window_logic_snapshot_restores_mid_stream_to_the_same_results() -> None:
    def spec() -> WindowSpec:
        return WindowSpec.build(
            EventClock("t", allowed_lateness=0.3),
            TumblingWindow(1.0),
            Named({"n": Count(), "avg": Mean("v")}),
            lambda k, s, e, res: (s, e, res),
            lambda: 0.0,
        )

    records = [r("a", t / 10, t) for t in (1, 5, 9, 12, 8, 15, 21, 3, 25, 33)]
    whole = WindowLogic(spec(), "a")
    expected = whole.on_batch(records) + whole.on_eof()

    first = WindowLogic(spec(), "a")
    out = first.on_batch(records[:5])
    import orjson

    saved = orjson.loads(orjson.dumps(first.snapshot()))  # it must survive JSON
    second = WindowLogic(spec(), "a", saved)
    out += second.on_batch(records[5:]) + second.on_eof()
    assert out == expected
    assert ("late", records[7]) in expected


def test_fast_aggregation_path_equals_the_general_one() -> None:
    records = [{"v": 2.0, "w": 1}, {"v": -1.5, "w": 7}, {"v": 4.25, "w": 3}]
    fast2 = Named({"n": Count(), "m": Mean("v"), "hi": Max("w")})
    assert fast2._fast is not None
    gen2 = Named({"n": Count(), "m": Mean("v"), "hi": Max("w")})
    gen2._fast = None
    a, b = fast2.zero(), gen2.zero()
    for rec in records:
        a, b = fast2.add(a, rec), gen2.add(b, rec)
    assert fast2.result(a) == gen2.result(b) == {"n": 3, "m": 4.75 / 3, "hi": 7}
    # a record without the field: the general path raises a KeyError naming it
    import pytest

    with pytest.raises(KeyError, match="no field 'v'"):
        fast2.add(fast2.zero(), {"x": 1})


async def test_a_bad_record_in_a_window_is_dead_lettered_without_touching_the_counts() -> None:
    records = [r("a", 0.1, 1.0), {"k": "a", "v": 2.0}, {"k": "a", "t": 0.3, "v": "warm"}, r("a", 0.4, 3.0)]
    p = Pipeline("bad-window")
    out = (
        p.source("in", records)
        .key_by(lambda x: x["k"])
        .window(TumblingWindow(1.0), EventClock("t"), name="win")
        .aggregate(n=Count(), total=Sum("v"), avg=Mean("v"))
        .collect()
    )
    result = await p.run()
    assert [(res["n"], res["total"], res["avg"]) for _k, res in out] == [(2, 4.0, 2.0)]
    assert result.stats["win"].dead_lettered == 2 and result.dead_lettered == 2
