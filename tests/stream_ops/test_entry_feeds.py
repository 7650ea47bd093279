"""A stage replica feeds each entry step once per input batch when its entries lead to separate steps (a sink
then writes once per batch, not once per message), and keeps the message order when they meet (on the memory
broker)."""

from __future__ import annotations

from typing import Any

from taskstream.brokers.memory import MemoryBroker
from taskstream.stream_ops import CallbackSink, MemoryStateStore, Pipeline, RunConfig
from taskstream.stream_ops.inbound import independent_entries
from taskstream.stream_ops.wire import Stop, batch_entry, batch_messages


def two_entries(name: str, meet: bool) -> tuple[Pipeline, list[list[Any]], list[list[Any]]]:
    """Stage ``out`` reads from sources ``a`` and ``b``: into a sink each, or (``meet``) merged into one."""
    p = Pipeline(name)
    first: list[list[Any]] = []
    second: list[list[Any]] = []
    a = p.source("a", [{"a": 0}]).stage("out")
    b = p.source("b", [{"b": 0}]).stage("out")
    if meet:
        a.merge(b).sink(CallbackSink(first.append, per_batch=True))
    else:
        a.sink(CallbackSink(first.append, per_batch=True))
        b.sink(CallbackSink(second.append, per_batch=True))
    return p, first, second


async def run_out(p: Pipeline, messages_per_entry: int) -> list[str]:
    """Publish ``messages_per_entry`` messages for each entry of stage ``out``, alternating, then a Stop; run the
    stage with every message in one input batch. Returns the entries, in the stage's order."""
    plan = p.plan()
    stage = plan.stages["out"]
    queue = stage.queue(0)
    broker = MemoryBroker()
    await broker.connect()
    try:
        await broker.declare(queue)
        for n in range(messages_per_entry):
            for e, entry in enumerate(stage.entries):
                mids = [f"{entry}-{n}-{i}" for i in range(3)]
                records = [(mid, batch_entry({"e": e, "n": n, "i": i}, entry, mid, 0)) for i, mid in enumerate(mids)]
                for message in batch_messages(records, f"{'ab'[e]}/0", 1.0):
                    await broker.publish(queue, message.body, headers=message.headers, message_id=message.message_id)
        stop = Stop.message()
        await broker.publish(queue, stop.body, headers=stop.headers, message_id=stop.message_id)
        config = RunConfig(batch_size=100, linger=0.5)  # every message in one input batch
        await p.run_stage("out", 0, broker=broker, store=MemoryStateStore(), config=config)
    finally:
        await broker.close()
    return stage.entries


async def test_separate_entries_are_fed_once_per_input_batch_each_in_message_order() -> None:
    p, first, second = two_entries("entry-feeds", meet=False)
    assert independent_entries(p.plan(), p.plan().stages["out"])
    await run_out(p, 4)
    assert len(first) == 1 and len(second) == 1  # one write per sink, not one per message
    assert first[0] == [{"e": 0, "n": n, "i": i} for n in range(4) for i in range(3)]
    assert second[0] == [{"e": 1, "n": n, "i": i} for n in range(4) for i in range(3)]


async def test_entries_that_meet_keep_the_order_of_the_messages() -> None:
    p, first, _ = two_entries("entry-feeds-meet", meet=True)
    assert not independent_entries(p.plan(), p.plan().stages["out"])
    await run_out(p, 2)
    got = [item for batch in first for item in batch]
    assert got == [{"e": e, "n": n, "i": i} for n in range(2) for e in range(2) for i in range(3)]
