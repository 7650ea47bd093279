"""S8: instrument stream to sinks, with Storm/Kafka-style parallelism.

Simulated sensors emit readings stamped with event time at the source, some out of order, some late, a few
bad. The pipeline::

    sensor -> calibrate (map) -> drop-bad (filter) -> by-sensor (key_by)
           -> [windows x3]  1 s tumbling + 2 s sliding (every 1 s) event-time windows, mean/min/max/count
           -> [store]       SQLite tables ``windows`` and ``late`` (+ JSON Lines, + an optional live view)

Run it fused in one process on the embedded broker::

    python examples/sensor_windows.py --db out/s8.db --live

or stage by stage over RabbitMQ, each replica its own process (what VMs or compose services run)::

    export TASKSTREAM_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/ SENSOR_WINDOWS_DB=out/s8.db
    taskstream pipeline run examples.sensor_windows:pipeline --stage windows --replica 0 &
    taskstream pipeline run examples.sensor_windows:pipeline --stage windows --replica 1 &
    taskstream pipeline run examples.sensor_windows:pipeline --stage windows --replica 2 &
    taskstream pipeline run examples.sensor_windows:pipeline --stage store &
    taskstream pipeline run examples.sensor_windows:pipeline --stage sensor

The window results are the same either way (watermarks are kept per sensor, so how sensors are spread over
replicas does not change which readings are late), also when a replica or the source stage is killed and
restarted (the sensor resumes at its committed position). To go to 2 window replicas, stop every process, then::

    SENSOR_WINDOWS_REPLICAS=2 taskstream pipeline rescale examples.sensor_windows:pipeline --stage windows --from 3

and start the stages again with ``SENSOR_WINDOWS_REPLICAS=2`` (replicas 0 and 1).
``taskstream pipeline graph examples.sensor_windows:pipeline -o s8.svg`` draws the stages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

from taskstream.stream_ops import (
    Count,
    EventClock,
    JsonLinesSink,
    Max,
    Mean,
    Min,
    Pipeline,
    SimulatedSensor,
    SlidingWindow,
    SQLiteSink,
    StdoutSink,
    TumblingWindow,
)

START = 1_700_000_000.0  # event time of the first reading (fixed, so every process builds the same stream)
WINDOW_COLUMNS = ["window", "key", "start", "end", "count", "mean", "min", "max"]
LATE_COLUMNS = ["window", "sensor", "seq", "t", "celsius"]


def calibrate(reading: dict[str, Any]) -> dict[str, Any]:
    """Raw value to degrees Celsius (a per-instrument linear correction)."""
    value = reading["value"]
    celsius = None if value is None else round(value * 1.02 - 0.3, 4)
    return {"sensor": reading["sensor"], "seq": reading["seq"], "t": reading["t"], "celsius": celsius}


def valid(reading: dict[str, Any]) -> bool:
    """Drop bad readings: missing values and physically impossible ones."""
    c = reading["celsius"]
    return c is not None and -50.0 < c < 150.0


def tagged(kind: str) -> Any:
    def tag(item: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        return (item[0], {"window": kind, **item[1]})

    return tag


def live_line(item: tuple[str, dict[str, Any]]) -> str:
    r = item[1]
    return (
        f"{r['window']:<8} {r['key']:<4} [{r['start'] - START:7.1f}, {r['end'] - START:7.1f})  "
        f"n={r['count']:<4} mean={r['mean']:7.3f}  min={r['min']:7.3f}  max={r['max']:7.3f}"
    )


def build_pipeline(
    *,
    db: str | os.PathLike[str] | None = None,
    jsonl: str | os.PathLike[str] | None = None,
    sensors: int = 4,
    count: int = 4000,
    rate: float = 400.0,
    replicas: int = 3,
    live: bool = False,
    realtime: bool = False,
    name: str = "sensor-windows",
) -> Pipeline:
    """The S8 pipeline. ``db`` is the SQLite file of the ``windows`` and ``late`` tables."""
    p = Pipeline(name)
    sensor = SimulatedSensor(sensors, rate=rate, count=count, start=START, realtime=realtime, seed=8)
    readings = (
        p.source("sensor", sensor)
        .map(calibrate, name="calibrate")
        .filter(valid, name="drop-bad")
        .key_by(lambda r: r["sensor"], name="by-sensor")
    )
    clock = EventClock("t", allowed_lateness=0.5)
    stats = {"count": Count(), "mean": Mean("celsius"), "min": Min("celsius"), "max": Max("celsius")}
    tumbling = readings.window(TumblingWindow(1.0), clock, name="tumbling", stage="windows").aggregate(**stats)
    sliding = readings.window(SlidingWindow(2.0, 1.0), clock, name="sliding", stage="windows").aggregate(**stats)
    p.stage("windows").parallelism(replicas)

    results = tumbling.map(tagged("tumbling")).merge(sliding.map(tagged("sliding"))).stage("store")
    late = tumbling.late.map(tagged("tumbling")).merge(sliding.late.map(tagged("sliding"))).stage("store")
    if db is not None:
        results.sink(SQLiteSink(db, "windows", columns=WINDOW_COLUMNS, primary_key=["window", "key", "start"]))
        late.sink(SQLiteSink(db, "late", columns=LATE_COLUMNS, primary_key=["window", "seq"]))
    if jsonl is not None:
        results.sink(JsonLinesSink(jsonl))
    if live:
        results.sink(StdoutSink(format=live_line))
    return p


def read_results(db: str | os.PathLike[str]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The ``windows`` and ``late`` rows, sorted, without the insert time (for comparing runs)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:  # `with sqlite3.connect()` alone does not close it
        windows = conn.execute(f"SELECT {', '.join(WINDOW_COLUMNS)} FROM windows ORDER BY 1, 2, 3").fetchall()
        late = conn.execute(f"SELECT {', '.join(LATE_COLUMNS)} FROM late ORDER BY 1, 3").fetchall()
    return windows, late


def _from_env() -> Pipeline:
    return build_pipeline(
        db=os.environ.get("SENSOR_WINDOWS_DB", "out/sensor_windows.db"),
        jsonl=os.environ.get("SENSOR_WINDOWS_JSONL") or None,
        count=int(os.environ.get("SENSOR_WINDOWS_COUNT", "4000")),
        rate=float(os.environ.get("SENSOR_WINDOWS_RATE", "400")),
        replicas=int(os.environ.get("SENSOR_WINDOWS_REPLICAS", "3")),
        realtime=os.environ.get("SENSOR_WINDOWS_REALTIME", "") == "1",
        name=os.environ.get("SENSOR_WINDOWS_NAME", "sensor-windows"),
    )


pipeline = _from_env()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="out/sensor_windows.db")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--broker", default="memory://")
    parser.add_argument("--distributed", action="store_true", help="every stage replica as its own consumer")
    parser.add_argument("--live", action="store_true", help="print each window as it closes")
    args = parser.parse_args(argv)
    Path(args.db).unlink(missing_ok=True)  # noqa: ASYNC240 - once, before the run
    p = build_pipeline(db=args.db, count=args.count, live=args.live)
    print(p.plan().describe())
    if args.distributed:
        results = await p.run_distributed(args.broker)
        for stage, runs in results.items():
            for run in runs:
                print(f"  {stage}[{run.replica}]: {run.received} in, {run.late} late")
    else:
        run = await p.run(args.broker)
        print(run.summary())
    windows, late = read_results(args.db)
    print(f"{len(windows)} window results, {len(late)} late readings (kept in table 'late') in {args.db}")
    for row in windows[:6]:
        print("  ", row)


if __name__ == "__main__":
    asyncio.run(main())
