"""``taskstream demo``: the main job on the embedded memory broker, no server needed.

Each section shows one half of taskstream and prints results people can read. Sections are plain async
functions in ``SECTIONS``; features add theirs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from pydantic import BaseModel

from taskstream.app import App
from taskstream.stream_ops.demo_section import stream_section
from taskstream.tasks.demo_section import tasks_section

__all__ = ["SECTIONS", "run_demo"]


class Reading(BaseModel):
    """One reading of a simulated temperature sensor."""

    sensor: str
    celsius: float
    t: float


async def consumers_section(broker_url: str) -> None:
    """A two-stage consumer chain: readings -> calibrate -> alerts, with a bad message dead-lettered."""
    app = App(broker_url)
    alerts: list[dict[str, object]] = []

    @app.consumer("demo.readings", publish_to="demo.calibrated")
    def calibrate(reading: Reading) -> Reading:
        return reading.model_copy(update={"celsius": round(reading.celsius * 1.02 - 0.3, 2)})

    @app.consumer("demo.calibrated")
    async def alert(reading: Reading) -> None:
        if reading.celsius > 30:
            alerts.append(reading.model_dump())

    rng = random.Random(7)
    async with app:
        for i in range(200):
            reading = Reading(sensor=f"s{i % 4}", celsius=rng.gauss(25, 4), t=time.time())
            await app.publish("demo.readings", reading)
        await app.broker.publish("demo.readings", b'{"sensor": "s9", "celsius": "warm"}')  # fails validation
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(c.stats.acked + c.stats.dead_lettered for c in app.consumers) < 401:
            await asyncio.sleep(0.05)
        stats = {c.queue: c.stats for c in app.consumers}
    print("consumers: readings -> calibrate -> alert")
    for queue, s in stats.items():
        print(f"  {queue:<18} acked={s.acked:<4} dead-lettered={s.dead_lettered}")
    print(f"  alerts (calibrated > 30 C): {len(alerts)}; first: {alerts[0] if alerts else None}")


SECTIONS: list[tuple[str, Callable[[str], Awaitable[None]]]] = [
    ("Consumers", consumers_section),
    ("Task futures", tasks_section),
    ("Stream pipeline", stream_section),
]


async def run_demo(broker_url: str = "memory://") -> None:
    """Run every demo section in order."""
    logging.basicConfig(level=logging.WARNING, format="  [log] %(levelname)s %(name)s: %(message)s")
    for title, section in SECTIONS:
        print(f"\n=== {title} ===")
        started = time.perf_counter()
        await section(broker_url)
        print(f"  ({time.perf_counter() - started:.2f} s)")
