"""Stateless operators, branch/merge, errors to the dead-letter queue, batch, rate_limit, plan rules."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import ConfigurationError
from taskstream.messages import loads
from taskstream.stream_ops import ManualTime, Pipeline, RunConfig, SimulatedSensor
from taskstream.stream_ops.stateful import Emit, KeyedLogic


async def test_map_filter_flat_map_key_by_inspect_sync_and_async() -> None:
    p = Pipeline("ops")
    seen: list[int] = []

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def is_small(x: int) -> bool:
        return x < 30

    stream = (
        p.source("n", range(20))
        .map(double)
        .filter(lambda x: x % 3 == 0)
        .filter(is_small)
        .flat_map(lambda x: [x, x + 1])
        .inspect(seen.append)
        .key_by(lambda x: x % 2)
        .map_value(lambda v: v * 10)
    )
    out = stream.collect()
    result = await p.run()
    assert seen == [0, 1, 6, 7, 12, 13, 18, 19, 24, 25]
    assert out == [(str(x % 2), x * 10) for x in seen]  # keys become strings
    assert result.received == 20
    assert result.dead_lettered == 0


async def test_async_iterator_source_and_order_across_batches() -> None:
    async def numbers() -> Any:
        for i in range(1000):
            if i % 100 == 0:
                await asyncio.sleep(0)
            yield i

    p = Pipeline("aiter")
    out = p.source("n", numbers()).map(lambda x: x + 1).collect()
    await p.run(config=RunConfig(batch_size=64))
    assert out == list(range(1, 1001))


async def test_branch_and_merge() -> None:
    p = Pipeline("branch")
    evens, odds = p.source("n", range(10)).branch(lambda x: x % 2 == 0)
    merged = evens.map(lambda x: ("even", x)).merge(odds.map(lambda x: ("odd", x)))
    out = merged.collect()
    odd_only = odds.collect()
    await p.run()
    assert sorted(out) == sorted([("even", x) for x in range(0, 10, 2)] + [("odd", x) for x in range(1, 10, 2)])
    assert odd_only == [1, 3, 5, 7, 9]


async def test_a_failing_item_is_dead_lettered_with_its_reason_and_the_rest_goes_on() -> None:
    hub = f"ops-{uuid.uuid4().hex[:6]}"
    broker = MemoryBroker(hub)
    p = Pipeline("failing")

    def invert(x: int) -> float:
        return 1 / x

    out = p.source("n", [1, 2, 0, 4]).map(invert, name="invert").collect()
    result = await p.run(broker)
    assert out == [1.0, 0.5, 0.25]
    assert result.dead_lettered == 1
    assert result.stats["invert"].dead_lettered == 1
    reader = MemoryBroker(hub)
    await reader.connect()
    dlq = p.plan().dead_letter_queue
    async with asyncio.timeout(5):
        delivery = await reader.consume(dlq).__anext__()
    assert "ZeroDivisionError" in delivery.headers["x-death-reason"]
    assert delivery.headers["x-step"] == "invert"
    assert loads(delivery.body) == {"item": 0}


async def test_batch_by_size_per_key_and_the_rest_at_end_of_stream() -> None:
    p = Pipeline("batch-size")
    out = p.source("n", range(7)).key_by(lambda x: "even" if x % 2 == 0 else "odd").batch(3).collect()
    await p.run()
    assert sorted(out) == [("even", [0, 2, 4]), ("even", [6]), ("odd", [1, 3, 5])]


async def test_batch_by_time_with_injected_time() -> None:
    clock = ManualTime(100.0)

    def arrive(i: int) -> int:
        # a value every 0.4 s: the clock moves as each value reaches the batch (set by the source, it could
        # run ahead of the batch while the source is read ahead)
        clock.set(100.0 + i * 0.4)
        return i

    p = Pipeline("batch-time")
    out = p.source("n", range(6)).map(arrive).batch(100, timeout=1.0).collect()  # unkeyed: one batch
    await p.run(now=clock, config=RunConfig(batch_size=1))
    # the first batch opens at t=100.0 and closes when a value arrives at t >= 101.0 (i=3 at 101.2)
    assert out == [[0, 1, 2, 3], [4, 5]]


async def test_rate_limit_spaces_items_with_injected_time() -> None:
    clock = ManualTime(0.0)
    times: list[float] = []
    p = Pipeline("rate")
    p.source("n", range(50)).rate_limit(10.0, burst=5, now=clock, sleep=clock.sleep).inspect(
        lambda _x: times.append(clock())
    ).collect()
    await p.run()
    assert len(times) == 50
    # 10 items/s with bursts of 5: item i passes no earlier than (i - 4) / 10 s
    for i, t in enumerate(times):
        assert t >= (i - 4) / 10 - 1e-9
    assert times[-1] == pytest.approx(4.5, abs=0.11)


class RunningTotal(KeyedLogic):
    """A custom stateful step on the primitive: emits the running sum of each key."""

    def __init__(self, state: Any) -> None:
        self.total = state or 0

    def on_batch(self, values: list[Any]) -> Emit:
        out: Emit = []
        for v in values:
            self.total += v
            out.append(("down", self.total))
        return out

    def snapshot(self) -> Any:
        return self.total


async def test_stateful_primitive_with_custom_logic() -> None:
    p = Pipeline("stateful")
    out = (
        p.source("n", [("a", 1), ("b", 10), ("a", 2), ("b", 20), ("a", 3)])
        .filter(lambda kv: True)
        .key_by(lambda kv: kv[0])
        .map_value(lambda kv: kv[1])
        .stateful(lambda ctx: lambda key, state: RunningTotal(state), name="totals")
        .collect()
    )
    await p.run()
    assert sorted(out) == [("a", 1), ("a", 3), ("a", 6), ("b", 10), ("b", 30)]


def test_plan_fuses_adjacent_stateless_steps_and_splits_at_stateful_ones() -> None:
    p = Pipeline("plan")
    keyed = p.source("src", range(3)).map(lambda x: x).filter(bool).key_by(str)
    keyed.batch(2, name="b").map(lambda x: x).collect()
    plan = p.plan()
    assert list(plan.stages) == ["src", "b"]
    assert plan.stages["src"].nodes[:4] == ["src", "map-2", "filter-3", "key_by-4"]
    assert plan.stages["b"].entries == ["b"]
    assert plan.stages["b"].queue(0) == "plan-b-0"


def test_plan_rules_give_clear_errors() -> None:
    p = Pipeline("rules")
    src = p.source("src", range(3))
    with pytest.raises(ConfigurationError, match="key_by"):
        src.window(__import__("taskstream.stream_ops", fromlist=["TumblingWindow"]).TumblingWindow(1.0))
    p.stage("src").parallelism(2)
    with pytest.raises(ConfigurationError, match="reads a source"):
        p.plan()

    p2 = Pipeline("rules2")
    keyed = p2.source("src", range(3)).key_by(str).stage("work").map(lambda kv: kv)
    keyed.keyed = True
    keyed.batch(2, stage="work")
    p2.stage("work").parallelism(2)
    with pytest.raises(ConfigurationError, match="not partitioned"):
        p2.plan()

    p3 = Pipeline("rules3")
    p3.source("src", range(3)).collect()
    p3.stage("nope").parallelism(2)
    with pytest.raises(ConfigurationError, match="no step runs in it"):
        p3.plan()

    with pytest.raises(ConfigurationError, match="not valid"):
        Pipeline("bad name!")
    with pytest.raises(ConfigurationError, match="no source"):
        Pipeline("empty").plan()


async def test_sensor_readings_have_late_out_of_order_and_bad_ones() -> None:
    sensor = SimulatedSensor(4, rate=100, count=2000, start=0.0, late=0.02, out_of_order=0.1, bad=0.02, seed=3)
    readings = sensor.readings(0.0)
    assert [r["seq"] for r in readings] == list(range(2000))
    due = [r["seq"] / 100 for r in readings]
    shifts = [d - r["t"] for d, r in zip(due, readings, strict=True)]
    late = sum(1 for s in shifts if s > 2.0)
    jittered = sum(1 for s in shifts if 0 < s <= 0.3 + 1e-9)
    bad = sum(1 for r in readings if r["value"] is None)
    assert 20 <= late <= 60 and 130 <= jittered <= 270 and 20 <= bad <= 60
    assert readings == SimulatedSensor(
        4, rate=100, count=2000, start=0.0, late=0.02, out_of_order=0.1, bad=0.02, seed=3
    ).readings(0.0)  # deterministic


async def test_batch_after_a_map_batches_unkeyed_items_together_and_keyed_ones_per_key() -> None:
    p = Pipeline("batch-after-map")
    tens = p.source("n", range(7)).map(lambda x: x * 10).batch(3).collect()  # keying unknown after a map
    pairs = p.source("kv", ["a1", "b2", "a3"]).map(lambda s: (s[0], int(s[1]))).batch(2).collect()
    result = await p.run()
    assert tens == [[0, 10, 20], [30, 40, 50], [60]]
    assert sorted(pairs) == [("a", [1, 3]), ("b", [2])]
    assert result.dead_lettered == 0


async def test_batch_after_a_map_stage_by_stage() -> None:
    p = Pipeline("batch-after-map-staged")
    out = p.source("n", range(7)).map(lambda x: x + 1).batch(4, name="fours").collect()
    results = await asyncio.wait_for(p.run_distributed(MemoryBroker(f"bm-{uuid.uuid4().hex[:6]}")), 20)
    assert sorted(out) == [[1, 2, 3, 4], [5, 6, 7]]
    assert all(run.dead_lettered == 0 for runs in results.values() for run in runs)


async def test_strings_and_lists_of_two_are_not_split_into_key_and_value() -> None:
    p = Pipeline("not-keyed")
    words = p.source("w", ["ab", "cd", "ae"]).map(str.lower).batch(5).collect()
    await p.run()
    assert words == [["ab", "cd", "ae"]]

    hub = f"nk-{uuid.uuid4().hex[:6]}"
    p2 = Pipeline("not-keyed-2")
    items: list[Any] = [("a", 1), ["a", 2], (3, 4), "ab", ("a", 5)]
    totals = (
        p2.source("kv", items)
        .map(lambda x: x)
        .stateful(lambda ctx: lambda key, state: RunningTotal(state), name="totals")
        .collect()
    )
    result = await p2.run(MemoryBroker(hub))
    assert totals == [("a", 1), ("a", 6)]  # only the (str, value) tuples are keyed items
    assert result.dead_lettered == 3
    reader = MemoryBroker(hub)
    await reader.connect()
    subscription = reader.consume(p2.plan().dead_letter_queue)
    dead = []
    async with asyncio.timeout(5):
        for _ in range(3):
            delivery = await subscription.__anext__()
            dead.append(loads(delivery.body)["item"])
            assert "call key_by first" in delivery.headers["x-death-reason"]
    assert sorted(map(str, dead)) == sorted(map(str, [["a", 2], [3, 4], "ab"]))
    await reader.close()


def test_stage_bounded_keeps_the_bound_that_is_not_passed() -> None:
    p = Pipeline("keep-bounds")
    p.source("src", []).stage("work").collect()
    spec = p.stage("work").bounded(max_messages=3).bounded(idle_timeout=30)
    assert (spec.max_messages, spec.idle_timeout) == (3, 30)
    spec.bounded(max_messages=5)
    assert (spec.max_messages, spec.idle_timeout) == (5, 30)
    work = p.plan().stages["work"]
    assert (work.max_messages, work.idle_timeout) == (5, 30)


async def test_rate_limit_follows_the_time_injected_into_the_run() -> None:
    clock = ManualTime(0.0)
    times: list[float] = []
    p = Pipeline("rate-run-clock")
    p.source("n", range(20)).rate_limit(10.0, burst=5).inspect(lambda _x: times.append(clock())).collect()
    await p.run(now=clock)  # no now=/sleep= on the step: it waits in the run's time
    assert len(times) == 20
    for i, t in enumerate(times):
        assert t >= (i - 4) / 10 - 1e-9
    assert times[-1] == pytest.approx(1.5, abs=0.11)


async def test_rate_limit_starts_afresh_when_the_clock_goes_back() -> None:
    clock = ManualTime(1000.0)
    times: list[float] = []

    async def numbers() -> Any:
        for i in range(20):
            if i == 10:
                clock.set(0.0)  # a wall clock set back
            yield i

    p = Pipeline("rate-clock-back")
    p.source("n", numbers()).rate_limit(10.0, burst=5).inspect(lambda _x: times.append(clock())).collect()
    await p.run(now=clock, config=RunConfig(batch_size=1))
    assert len(times) == 20
    assert times[-1] < 2.0  # not a wait of 1000 s for the time lost
