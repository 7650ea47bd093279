"""The "Stream pipeline" section of ``taskstream demo``: a simulated sensor through windows, on memory."""

from __future__ import annotations

from typing import Any

from taskstream.stream_ops.aggregators import Count, Max, Mean, Min
from taskstream.stream_ops.pipeline import Pipeline
from taskstream.stream_ops.sources.instruments import SimulatedSensor
from taskstream.stream_ops.windows.clock import EventClock
from taskstream.stream_ops.windows.windowers import TumblingWindow

__all__ = ["stream_section"]


async def stream_section(broker_url: str) -> None:
    """sensor -> calibrate -> filter -> key_by -> 1 s tumbling windows (event time) -> mean/min/max/count."""
    p = Pipeline("demo-sensors")
    sensor = SimulatedSensor(3, rate=300, count=3000, start=0.0, late=0.01, bad=0.02, seed=4)
    windows = (
        p.source("sensor", sensor)
        .map(lambda r: {**r, "celsius": None if r["value"] is None else round(r["value"] * 1.02 - 0.3, 3)})
        .filter(lambda r: r["celsius"] is not None)
        .key_by(lambda r: r["sensor"])
        .window(TumblingWindow(1.0), EventClock("t", allowed_lateness=0.5))
        .aggregate(count=Count(), mean=Mean("celsius"), min=Min("celsius"), max=Max("celsius"))
    )
    results: list[Any] = windows.collect()
    late: list[Any] = windows.late.collect()
    run = await p.run(broker_url)
    print("stream pipeline: sensor -> calibrate -> filter -> key_by -> 1 s tumbling window (event time)")
    print(
        f"  {run.received} readings, {len(results)} windows, {len(late)} late readings (side output), "
        f"{run.dead_lettered} dead-lettered"
    )
    full = [kv for kv in results if kv[1]["start"] >= 0]  # (jittered first readings open a window before 0)
    for key, r in sorted(full, key=lambda kv: (kv[1]["start"], kv[0]))[:6]:
        print(
            f"  {key} [{r['start']:4.1f}, {r['end']:4.1f})  n={r['count']:<4} mean={r['mean']:6.2f} "
            f"min={r['min']:6.2f} max={r['max']:6.2f}"
        )
    if late:
        key, reading = late[0]
        print(f"  first late reading: {key} seq={reading['seq']} t={reading['t']:.2f} (its window had closed)")
