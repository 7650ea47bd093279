"""A record bound for every entry step of a stage carries ``to="*"`` (one short string instead of a list of
names per record); a record for some of them still names them; readers take both, and a distributed run through
a two-entry stage gives the fused results (on the memory broker)."""

from __future__ import annotations

from typing import Any

from taskstream.brokers.memory import MemoryBroker
from taskstream.messages import loads
from taskstream.stream_ops import Count, EventClock, Pipeline, SlidingWindow, TumblingWindow
from taskstream.stream_ops.inbound import entry_of, read_records
from taskstream.stream_ops.outbox import Outbox
from taskstream.stream_ops.wire import ALL_ENTRIES, is_batch


def two_windows(name: str) -> tuple[Pipeline, list[Any], list[Any]]:
    """Two window steps fed by the same keyed stream, both entries of stage ``windows`` (2 replicas)."""
    p = Pipeline(name)
    readings = [{"k": f"s{i % 3}", "t": i * 0.25} for i in range(400)]
    keyed = p.source("numbers", readings).key_by(lambda r: r["k"])
    clock = EventClock("t", allowed_lateness=0.0)
    tumbling = keyed.window(TumblingWindow(1.0), clock, name="tumbling", stage="windows").aggregate(n=Count())
    sliding = keyed.window(SlidingWindow(2.0, 1.0), clock, name="sliding", stage="windows").aggregate(n=Count())
    p.stage("windows").parallelism(2)
    return p, tumbling.collect(), sliding.collect()


def records_of(messages: list[Any]) -> list[list[Any]]:
    docs = [loads(m.body) for m in messages]
    assert all(is_batch(doc) for doc in docs)
    return [r for doc in docs for r in doc["body"]]


def test_the_outbox_writes_star_for_every_entry_and_the_names_for_some() -> None:
    p, _, _ = two_windows("star-outbox")
    plan = p.plan()
    target = plan.stages["windows"]
    assert target.entries == ["tumbling", "sliding"]
    outbox = Outbox(plan, plan.stages["numbers"], 0, lambda: 1.0)
    items = [(f"s{i}", {"t": i}) for i in range(6)]
    assert outbox.add(target, list(target.entries), items, [f"numbers#{i}" for i in range(6)]) is None
    assert outbox.add(target, ["sliding"], items[:2], [f"x#{i}" for i in range(2)]) is None
    assert outbox.add(target, ["sliding", "tumbling"], items[:2], [f"y#{i}" for i in range(2)]) is None
    tos = [r[1] for messages in outbox.take().values() for r in records_of(messages)]
    assert sorted(map(str, tos)) == sorted(
        [ALL_ENTRIES] * 6 + ["sliding"] * 2 + [str(["sliding", "tumbling"])] * 2  # another order: named
    )


def test_readers_map_star_to_every_entry_in_the_stage_order() -> None:
    both = ["tumbling", "sliding"]
    assert entry_of(ALL_ENTRIES, both) == ("tumbling", "sliding")
    assert entry_of(ALL_ENTRIES, ["only"]) == "only"
    well_formed = [[f"r{i}", ALL_ENTRIES, i % 4, "k", {"n": i}] for i in range(5)]
    read = read_records(well_formed, "up/0", both, set())
    assert read.runs() == [(("tumbling", "sliding"), [("k", {"n": i}) for i in range(5)], read.fresh)]
    mixed: list[Any] = [*well_formed[:2], ["q", "sliding", 1, "k", 9], ["bad", ALL_ENTRIES, 999, "k", 0]]
    read = read_records(mixed, "up/0", both, set())  # record by record: "*" there too
    assert [(t, ids) for t, _, ids in read.runs()] == [(("tumbling", "sliding"), ["r0", "r1"]), ("sliding", ["q"])]
    assert [index for index, _, _ in read.bad] == [3]


async def test_a_two_entry_stage_run_distributed_gives_the_fused_results() -> None:
    p, tumbling, sliding = two_windows("star-fused")
    await p.run("memory://")
    expected = (sorted(map(str, tumbling)), sorted(map(str, sliding)))
    assert expected[0] and expected[1]
    p, tumbling, sliding = two_windows("star-distributed")
    broker = MemoryBroker()
    published: list[bytes] = []
    original = broker.publish_batch

    async def spy(queue: str, messages: Any) -> None:
        published.extend(m.body for m in messages if "-windows-" in queue)
        await original(queue, messages)

    broker.publish_batch = spy  # type: ignore[method-assign]
    await broker.connect()
    try:
        await p.run_distributed(broker)
    finally:
        await broker.close()
    assert (sorted(map(str, tumbling)), sorted(map(str, sliding))) == expected
    records = [r for body in published if is_batch(doc := loads(body)) for r in doc["body"]]
    assert len(records) == 400 and {r[1] for r in records} == {ALL_ENTRIES}
