"""S8 stage by stage on the memory broker with a stage replica killed between publishing its outputs and
committing its snapshot (the worst moment), then restarted: the results equal the fused run's.

A source stage resumes at its committed position instead of replaying its readings, and what the killed replica
publishes again carries the ids it had, so the replica downstream skips it. The kill is a fault-injection point in
a real state store (its commit never returns for the chosen replica), followed by a hard cancel of the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from examples import sensor_windows
from taskstream.brokers.memory import MemoryBroker
from taskstream.stream_ops import MemoryStateStore, Pipeline, RunConfig, RunResult

COUNT = 3000


class DyingStore(MemoryStateStore):
    """A memory store whose ``victim`` namespace dies at its ``at``-th commit (called after the publish).

    Until the victim is restarted, the source stage's commits wait: the sensor stays about one batch ahead, as
    a source feeding a stalled replica would.
    """

    def __init__(self, victim: str, at: int, source: str) -> None:
        super().__init__()
        self.victim, self.at, self.source = victim, at, source
        self.commits = 0
        self.dying = asyncio.Event()
        self.restarted = asyncio.Event()

    async def commit(self, namespace: str, updates: Mapping[str, Any]) -> None:
        if namespace == self.victim and not self.dying.is_set():
            self.commits += 1
            if self.commits == self.at:
                self.dying.set()
                await asyncio.Event().wait()  # the process is gone: this commit never happens
        if namespace == self.source and self.dying.is_set() and namespace != self.victim:
            await self.restarted.wait()
        await super().commit(namespace, updates)


async def fused(tmp: Path) -> tuple[list[Any], list[Any]]:
    db = tmp / "fused.db"
    await sensor_windows.build_pipeline(db=db, count=COUNT, rate=1000).run()
    return sensor_windows.read_results(db)


async def staged_with_a_kill(tmp: Path, stage: str, replica: int, at: int) -> dict[str, list[RunResult]]:
    """Run every stage replica as a task; kill ``stage``/``replica`` at its ``at``-th commit and start it again."""
    name = f"s8-{stage}-killed"
    p: Pipeline = sensor_windows.build_pipeline(db=tmp / "staged.db", count=COUNT, rate=1000, realtime=True, name=name)
    broker = MemoryBroker()
    await broker.connect()
    store = DyingStore(f"{name}/{stage}/{replica}", at, source=f"{name}/sensor/0")
    config = RunConfig(batch_size=16, prefetch=16)
    results: dict[str, list[RunResult]] = {}

    def start(st: str, i: int) -> asyncio.Task[RunResult]:
        return asyncio.create_task(p.run_stage(st, i, broker=broker, store=store, config=config))

    tasks = {(st, i): start(st, i) for st, sp in p.plan().stages.items() for i in range(sp.parallelism)}
    try:
        async with asyncio.timeout(120):  # a bound for a broken build, not a measurement
            await store.dying.wait()
            victim = tasks[(stage, replica)]
            victim.cancel()  # killed hard: no flush, no end-of-stream, nothing acked
            await asyncio.gather(victim, return_exceptions=True)
            tasks[(stage, replica)] = start(stage, replica)
            store.restarted.set()
            for (st, _i), task in sorted(tasks.items()):
                results.setdefault(st, []).append(await task)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await broker.close()
    return results


async def test_a_source_stage_killed_after_publishing_resumes_where_it_committed(tmp_path: Path) -> None:
    expected = await fused(tmp_path)
    results = await staged_with_a_kill(tmp_path, "sensor", 0, at=40)
    assert sensor_windows.read_results(tmp_path / "staged.db") == expected
    (source,) = results["sensor"]
    assert source.restored and source.received == COUNT  # it went on from its position, not from the start
    # the batch published before the kill came again with the same ids, and the windows skipped it
    assert sum(run.duplicates_skipped for run in results["windows"]) > 0


async def test_a_window_replica_killed_after_publishing_gives_the_fused_results(tmp_path: Path) -> None:
    expected = await fused(tmp_path)
    results = await staged_with_a_kill(tmp_path, "windows", 1, at=60)
    assert sensor_windows.read_results(tmp_path / "staged.db") == expected
    assert results["windows"][1].restored
