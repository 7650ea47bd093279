"""App and @app.consumer on the memory broker: validation, raw bodies, sync/async, hooks, control."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from taskstream import App, Message, Reject
from taskstream.brokers.base import Delivery, Subscription, dead_letter_name
from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import BrokerConnectionError
from taskstream.messages import decode


class Reading(BaseModel):
    sensor: str
    value: float


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def drain(app: App, queue: str, n: int, timeout: float = 10.0) -> list[object]:
    out: list[object] = []
    await app.broker.declare(queue)
    async with asyncio.timeout(timeout), app.broker.consume(queue, prefetch=100) as sub:
        async for delivery in sub:
            out.append(decode(delivery.body).body)
            await delivery.ack()
            if len(out) == n:
                break
    return out


async def test_body_is_validated_and_return_value_published() -> None:
    app = App(MemoryBroker())

    @app.consumer("in", publish_to="out")
    def double(reading: Reading) -> Reading:
        return Reading(sensor=reading.sensor, value=reading.value * 2)

    async with app:
        await app.publish("in", {"sensor": "a", "value": 1.5})
        assert await drain(app, "out", 1) == [{"sensor": "a", "value": 3.0}]


async def test_invalid_body_goes_to_dead_letter_with_reason_and_good_ones_flow() -> None:
    app = App(MemoryBroker())
    seen: list[Point] = []

    @app.consumer("points", max_attempts=3)
    async def take(point: Point) -> None:
        seen.append(point)

    async with app:
        await app.publish("points", {"x": "not a number", "y": 1})
        await app.publish("points", {"x": 1, "y": 2})
        [dead] = await _dlq(app, "points", 1)
        assert "does not match" in str(dead.headers["x-death-reason"])
        assert "x" in str(dead.headers["x-death-reason"])
        assert dead.headers["x-attempts"] == 1  # not retried: retrying cannot fix bad input
    assert seen == [Point(1, 2)]


async def _dlq(app: App, queue: str, n: int) -> list[object]:
    got = []
    async with asyncio.timeout(10), app.broker.consume(dead_letter_name(queue), prefetch=10) as sub:
        async for delivery in sub:
            got.append(delivery)
            await delivery.ack()
            if len(got) == n:
                break
    return got


async def test_raw_json_from_a_plain_client_is_consumed() -> None:
    app = App(MemoryBroker())
    got: list[Reading] = []

    @app.consumer("raw-in")
    async def take(reading: Reading) -> None:
        got.append(reading)

    async with app:
        await app.broker.publish("raw-in", b'{"sensor": "plain", "value": 7}')
        async with asyncio.timeout(10):
            while not got:
                await asyncio.sleep(0.01)
    assert got == [Reading(sensor="plain", value=7.0)]


async def test_reject_dead_letters_at_once_and_message_param_is_injected() -> None:
    app = App(MemoryBroker())
    attempts: list[int] = []

    @app.consumer("ctl")
    async def handle(body: dict[str, int], message: Message) -> None:
        attempts.append(message.delivery.attempt)
        raise Reject("not for us")

    async with app:
        await app.publish("ctl", {"a": 1})
        [dead] = await _dlq(app, "ctl", 1)
        assert "not for us" in str(dead.headers["x-death-reason"])
    assert attempts == [1]


async def test_startup_hook_runs_once_before_consumers() -> None:
    app = App(MemoryBroker())
    events: list[str] = []

    @app.on_startup
    async def load() -> None:
        events.append("startup")

    @app.on_shutdown
    def unload() -> None:
        events.append("shutdown")

    @app.consumer("hooks")
    def handle(body: int) -> None:
        events.append(f"handle {body}")

    async with app:
        await app.publish("hooks", 1)
        await app.publish("hooks", 2)
        async with asyncio.timeout(10):
            while len(events) < 3:
                await asyncio.sleep(0.01)
    assert events[0] == "startup"
    assert sorted(events[1:3]) == ["handle 1", "handle 2"]
    assert events[-1] == "shutdown"


SIGTERM_APP = """
import asyncio, sys
from taskstream import App
app = App()
@app.on_startup
async def feed():
    await app.broker.declare("work")
    for i in range(3):
        await app.publish("work", i)
@app.consumer("work", concurrency=3)
async def slow(n: int) -> None:
    print(f"start {n}", flush=True)
    await asyncio.sleep(1.0)
    print(f"done {n}", flush=True)
"""


def test_sigterm_finishes_in_flight_work_and_exits_zero(tmp_path: Path) -> None:
    (tmp_path / "sigterm_app.py").write_text(SIGTERM_APP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskstream.cli", "run", "sigterm_app:app"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        started = 0
        for line in proc.stdout:
            started += line.startswith("start")
            if started == 3:
                break
        assert started == 3, proc.stderr.read() if proc.stderr else ""  # it exited before running all three
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # a failure above: never leave the child running
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(line for line in rest.splitlines() if line.startswith("done")) == ["done 0", "done 1", "done 2"]


@pytest.mark.parametrize("bad", ["", "nosuchmodule:app"])
def test_run_with_a_bad_target_gives_a_clear_error(bad: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskstream.cli", "run", bad or "tests.core.test_app:Reading"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "taskstream: error:" in result.stderr


class _BrokenSubscription(Subscription):
    """Delivers what the memory broker has, then fails as a broker whose connection is gone for good."""

    def __init__(self, inner: Subscription) -> None:
        self.inner = inner
        self.calls = 0

    async def __anext__(self) -> Delivery:
        self.calls += 1
        if self.calls > 1:
            raise BrokerConnectionError("connection lost for good")
        return await self.inner.__anext__()

    async def close(self) -> None:
        await self.inner.close()


class _FailingBroker(MemoryBroker):
    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        return _BrokenSubscription(super().consume(queue, prefetch=prefetch))


async def test_serve_stops_with_a_failure_when_a_consumer_gives_up() -> None:
    app = App(_FailingBroker())
    handled: list[int] = []

    @app.consumer("fragile")
    async def take(n: int) -> None:
        handled.append(n)

    async def feed() -> None:
        while not app.consumers:
            await asyncio.sleep(0.01)
        await app.publish("fragile", 1)

    feeder = asyncio.create_task(feed())
    async with asyncio.timeout(30):
        await app.serve()  # returns by itself: nothing requested the stop
    await feeder
    assert handled == [1]
    assert app.failure is not None and "connection lost for good" in app.failure
