"""Idle watermarks: in an endless stream, a key that goes quiet still has its last window closed.

The runtime's time is a :class:`ManualTime` the source advances, so nothing here waits on the wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskstream.errors import ConfigurationError
from taskstream.stream_ops import (
    CallbackSink,
    Count,
    EventClock,
    ManualTime,
    Pipeline,
    Source,
    SourceBatch,
    TumblingWindow,
)
from taskstream.stream_ops.runtime_context import RuntimeContext

STEP = 0.1
QUIET_AFTER = 5.0  # the "quiet" sensor sends readings stamped before this, then nothing
LAST_QUIET = 4.9


class EndlessSensors(Source):
    """Every ``STEP`` of the manual time, one reading of ``busy`` (forever) and one of ``quiet`` (until 5 s)."""

    def __init__(self, time: ManualTime) -> None:
        super().__init__()
        self.time = time

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        i = 0
        while True:
            t = round(i * STEP, 6)
            self.time.set(t)
            items = [{"sensor": "busy", "t": t}]
            if t < QUIET_AFTER:
                items.append({"sensor": "quiet", "t": t})
            yield SourceBatch(items)
            i += 1


async def run_until(clock: EventClock, stop_at: float) -> tuple[list[tuple[float, dict[str, Any]]], ManualTime]:
    """Run the endless pipeline until the manual time reaches ``stop_at``; the quiet key's results with the time
    each was emitted."""
    time = ManualTime(0.0)
    emitted: list[tuple[float, dict[str, Any]]] = []
    reached = asyncio.Event()

    def keep(item: Any) -> None:
        key, result = item
        if key == "quiet":
            emitted.append((time(), result))

    def watch(item: Any) -> Any:
        if time() >= stop_at:
            reached.set()
        return item

    p = Pipeline("idle-watermarks")
    (
        p.source("sensors", EndlessSensors(time))
        .map(watch)
        .key_by(lambda r: r["sensor"])
        .window(TumblingWindow(1.0), clock, name="per-second")
        .aggregate(n=Count())
        .sink(CallbackSink(keep))
    )
    run = asyncio.create_task(p.run(now=time))
    try:
        async with asyncio.timeout(60):  # a bound for a broken build, not a measurement
            await reached.wait()
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    return emitted, time


async def test_a_quiet_keys_last_window_closes_within_idle_timeout_plus_a_window() -> None:
    idle = 2.0
    emitted, _ = await run_until(EventClock("t", allowed_lateness=0.5, idle_timeout=idle), stop_at=12.0)
    windows = {result["start"]: (at, result["n"]) for at, result in emitted}
    assert sorted(windows) == [0.0, 1.0, 2.0, 3.0, 4.0]  # every window of the quiet key closed, none twice
    assert all(n == 10 for _at, n in windows.values())
    closed_at, _ = windows[4.0]
    # its records alone cannot close [4, 5): the watermark moved on with the clock once the key was quiet
    assert LAST_QUIET + idle <= closed_at <= LAST_QUIET + idle + 1.0


async def test_without_idle_timeout_the_quiet_keys_last_window_stays_open() -> None:
    emitted, _ = await run_until(EventClock("t", allowed_lateness=0.5), stop_at=12.0)
    assert sorted(result["start"] for _at, result in emitted) == [0.0, 1.0, 2.0, 3.0]


def test_idle_timeout_must_be_a_positive_number_of_seconds() -> None:
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="idle_timeout must be a positive number"):
            EventClock("t", idle_timeout=bad)
