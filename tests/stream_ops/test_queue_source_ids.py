"""Records read from a queue keep their message's id as their lineage: a restarted source stage (which has no
position to resume from) never reuses the ids of records it published before, and what it reads again after a
kill is recognised downstream."""

from __future__ import annotations

import asyncio
from typing import Any

from taskstream.brokers.memory import MemoryBroker
from taskstream.stream_ops import MemoryStateStore, Pipeline, QueueSource, RunConfig
from taskstream.stream_ops.sinks import CallbackSink
from taskstream.stream_ops.wire import send_stop
from tests.support.waiting import wait_for


async def test_a_restarted_queue_source_stage_publishes_fresh_ids_downstream() -> None:
    broker = MemoryBroker()
    await broker.connect()
    await broker.declare("qs-ids-in")
    got: list[Any] = []
    p = Pipeline("qs-ids")
    p.source("src", QueueSource("qs-ids-in", linger=0.01)).map(lambda r: r).stage("b").map(lambda r: r).sink(
        CallbackSink(got.append)
    )
    store = MemoryStateStore()
    config = RunConfig(batch_size=4)

    def start(stage: str) -> asyncio.Task[Any]:
        return asyncio.create_task(p.run_stage(stage, 0, broker=broker, store=store, config=config))

    downstream, source = start("b"), start("src")
    try:
        for n in range(10):
            await broker.publish("qs-ids-in", b'{"n": %d}' % n)
        await wait_for(lambda: len(got) >= 10, what="the first ten records downstream", timeout=30)
        source.cancel()  # killed: a new process starts with no memory of what it published
        await asyncio.gather(source, return_exceptions=True)
        source = start("src")
        for n in range(10, 20):
            await broker.publish("qs-ids-in", b'{"n": %d}' % n)
        await wait_for(lambda: len(got) >= 20, what="the next ten records downstream", timeout=30)
        await send_stop(broker, "qs-ids-in")
        await asyncio.wait_for(asyncio.gather(source, downstream), 30)
    finally:
        for task in (source, downstream):
            task.cancel()
        await asyncio.gather(source, downstream, return_exceptions=True)
        await broker.close()
    assert sorted(r["n"] for r in got) == list(range(20))
