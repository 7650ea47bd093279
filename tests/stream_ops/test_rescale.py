"""S8 with 3 window replicas stopped mid-run (every stage killed), rescaled to 2 and resumed: the fused results.

The memory broker and a memory state store are kept across the two runs, as RabbitMQ and a SQLite or Redis store
are between processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from examples import sensor_windows
from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import ConfigurationError
from taskstream.messages import loads
from taskstream.stream_ops import MemoryStateStore, Pipeline, RunConfig
from taskstream.stream_ops.keygroups import KEY_GROUPS, group_of, groups_of, owner
from taskstream.stream_ops.rescale import rescale_stage
from tests.support.waiting import wait_for

COUNT = 3000
NAME = "s8-rescale"


def s8(tmp: Path, replicas: int) -> Pipeline:
    return sensor_windows.build_pipeline(
        db=tmp / "staged.db", count=COUNT, rate=1000, realtime=True, replicas=replicas, name=NAME
    )


def start_all(p: Pipeline, broker: MemoryBroker, store: MemoryStateStore) -> list[asyncio.Task[Any]]:
    config = RunConfig(batch_size=32)
    return [
        asyncio.create_task(p.run_stage(name, i, broker=broker, store=store, config=config))
        for name, st in p.plan().stages.items()
        for i in range(st.parallelism)
    ]


def source_position(store: MemoryStateStore) -> int:
    meta = store.data.get(f"{NAME}/sensor/0", {}).get("meta")
    return int(loads(meta)["positions"]["sensor"]["seq"]) if meta else 0


async def test_s8_stopped_with_three_window_replicas_and_resumed_with_two_gives_the_fused_results(
    tmp_path: Path,
) -> None:
    reference = tmp_path / "fused.db"
    await sensor_windows.build_pipeline(db=reference, count=COUNT, rate=1000).run()
    expected = sensor_windows.read_results(reference)

    broker = MemoryBroker()
    await broker.connect()
    store = MemoryStateStore()
    first = start_all(s8(tmp_path, 3), broker, store)
    try:
        # stop the whole pipeline half-way through
        await wait_for(lambda: source_position(store) >= COUNT // 2, what="the source half-way", interval=0.01)
    finally:
        for task in first:
            task.cancel()  # killed hard: nothing flushed, nothing more acked
        await asyncio.gather(*first, return_exceptions=True)
    assert not any(task.done() and not task.cancelled() for task in first), "the run ended before it was stopped"
    # the sensors' groups: s2 on replica 1, s0, s1 and s3 on replica 2, which goes away; all on replica 1 after
    sensors = ["s0", "s1", "s2", "s3"]
    assert {owner(group_of(s), 3) for s in sensors} == {1, 2} and {owner(group_of(s), 2) for s in sensors} == {1}
    assert store.data.get(f"{NAME}/windows/2"), "the replica that goes away holds window state"

    report = await rescale_stage(s8(tmp_path, 2), "windows", 3, broker=broker, store=store)
    assert (report.old, report.new) == (3, 2) and report.keys > 0
    assert f"{NAME}/windows/2" not in store.data or not store.data[f"{NAME}/windows/2"]

    second = start_all(s8(tmp_path, 2), broker, store)
    async with asyncio.timeout(120):
        results = await asyncio.gather(*second)
    await broker.close()
    assert sensor_windows.read_results(tmp_path / "staged.db") == expected
    assert all(run.ended_by == "end-of-stream" for run in results)
    assert any(run.restored for run in results)


def test_key_groups_are_owned_in_ranges_that_cover_every_group_once() -> None:
    for replicas in (1, 2, 3, 7, KEY_GROUPS):
        owned = [g for i in range(replicas) for g in groups_of(i, replicas)]
        assert owned == list(range(KEY_GROUPS))
        assert all(owner(g, replicas) == i for i in range(replicas) for g in groups_of(i, replicas))
    assert group_of("s1") == group_of("s1") and 0 <= group_of("s1") < KEY_GROUPS


async def test_rescaling_a_source_stage_or_from_a_bad_count_is_refused(tmp_path: Path) -> None:
    broker = MemoryBroker()
    await broker.connect()
    with pytest.raises(ConfigurationError, match="reads a source"):
        await rescale_stage(s8(tmp_path, 2), "sensor", 2, broker=broker, store=MemoryStateStore())
    with pytest.raises(ConfigurationError, match="positive integer"):
        await rescale_stage(s8(tmp_path, 2), "windows", 0, broker=broker, store=MemoryStateStore())
    await broker.close()
