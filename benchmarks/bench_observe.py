"""Overhead of metrics: task throughput and stream rate with Prometheus metrics on vs off (goal >= 0.95x).

* tasks: ``App(metrics=...)`` on the embedded memory broker, workers in the process, ``N_TASKS`` calls of an
  async no-op submitted at once and awaited (the broker costs nothing here, so the metrics' share is the largest
  it can be);
* streams: a two-stage pipeline run stage by stage (``run_distributed``) on the memory broker, ``N_RECORDS``
  records through a map stage into a sink stage, with a recorder attached to the broker or not.

On and off alternate within each repetition, so drift on a shared machine hits both.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from common import Row
from prometheus_client import CollectorRegistry

from taskstream import App
from taskstream.brokers.memory import MemoryBroker
from taskstream.observe.metrics import attach, resolve
from taskstream.stream_ops import IterableSource, ListSink, Pipeline

N_TASKS = 3_000
N_RECORDS = 30_000


async def _noop(i: int) -> int:
    return i


async def task_rate(metrics: bool) -> float:
    app = App(f"memory://bench-observe-{uuid.uuid4().hex[:6]}", metrics=CollectorRegistry() if metrics else False)
    noop = app.task(queue="bench.observe")(_noop)
    async with app:
        await noop.submit(0)  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(noop.submit(i) for i in range(N_TASKS)))
        return N_TASKS / (time.perf_counter() - started)


async def stream_rate(metrics: bool) -> float:
    broker = MemoryBroker()
    if metrics:
        attach(broker, resolve(CollectorRegistry()))
    sink = ListSink()
    p = Pipeline(f"bench-observe-{uuid.uuid4().hex[:6]}")
    p.source("numbers", IterableSource(range(N_RECORDS))).map(lambda n: n + 1).stage("store").sink(sink)
    started = time.perf_counter()
    await p.run_distributed(broker)
    elapsed = time.perf_counter() - started
    assert len(sink.items) == N_RECORDS
    return N_RECORDS / elapsed


def measure(repeats: int = 3) -> list[Row]:
    tasks_on: list[float] = []
    tasks_off: list[float] = []
    stream_on: list[float] = []
    stream_off: list[float] = []
    asyncio.run(task_rate(False))  # warm-up: imports, first-use caches (not timed)
    repeats = max(repeats, 7)  # each run is short; a ratio of medians needs more rounds than the others
    for i in range(repeats):
        print(f"  observe: repetition {i + 1}/{repeats}", flush=True)
        first_on = i % 2 == 0
        for on in (first_on, not first_on):
            (tasks_on if on else tasks_off).append(asyncio.run(task_rate(on)))
            (stream_on if on else stream_off).append(asyncio.run(stream_rate(on)))
    return [
        Row(
            f"task throughput, {N_TASKS:,} async no-ops (memory broker)",
            "metrics on",
            "metrics off",
            "tasks/s",
            tasks_on,
            tasks_off,
            target=0.95,
            notes="the overhead of Prometheus metrics on the message path",
        ),
        Row(
            f"stream rate, {N_RECORDS:,} records over 2 stages (memory broker)",
            "metrics on",
            "metrics off",
            "records/s",
            stream_on,
            stream_off,
            target=0.95,
            notes="step counters are read at scrape time; deliveries are counted per message",
        ),
    ]


if __name__ == "__main__":
    for row in measure(3):
        print(f"{row.workload}: on {row.value:,.0f} vs off {row.baseline_value:,.0f} {row.unit} = {row.ratio:.3f}x")
