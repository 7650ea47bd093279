"""Sources: iterables (bounded), JSON Lines (once and followed), HTTP polling, ZeroMQ SUB, queues, camera."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import zmq
import zmq.asyncio
from aiohttp import web

from taskstream.brokers.memory import MemoryBroker
from taskstream.messages import Envelope, encode
from taskstream.stream_ops import (
    CameraSource,
    HttpPollSource,
    IterableSource,
    JsonLinesSource,
    Pipeline,
    QueueSource,
    SimulatedCamera,
    ZmqSubSource,
    send_stop,
)
from tests.support.ports import free_port
from tests.support.waiting import wait_for


async def test_iterable_source_bounded_by_count() -> None:
    p = Pipeline("bounded")
    out = p.source("n", IterableSource(range(1000), max_items=25)).collect()
    result = await p.run()
    assert out == list(range(25)) and result.received == 25


async def test_json_lines_source_skips_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n\n{"a": 2}\n{"a": 3}')  # last line without newline
    source = JsonLinesSource(path)
    p = Pipeline("jsonl")
    out = p.source("f", source).collect()
    await p.run()
    assert out == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert source.bad_lines == 1


async def test_json_lines_follow_mode_reads_appended_lines_until_stop(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    path.write_bytes(b'{"n": 0}\n')
    p = Pipeline("follow")
    source = JsonLinesSource(path, follow=True, poll_interval=0.02)
    out = p.source("f", source).collect()
    task = asyncio.create_task(p.run())

    def append(data: bytes) -> None:
        with open(path, "ab") as f:
            f.write(data)

    await wait_for(lambda: out == [{"n": 0}], what="the first line", timeout=10)
    append(b'{"n": 1}\n{"n"')  # half a line: must wait for the rest
    await wait_for(lambda: len(out) >= 2, what="the appended line", timeout=10)
    await asyncio.sleep(0.2)  # ten polls: time for the half line to be (wrongly) read
    assert out == [{"n": 0}, {"n": 1}] and source.bad_lines == 0
    append(b": 2}\n")
    await wait_for(lambda: len(out) >= 3, what="the completed line", timeout=10)
    append(b'{"control": "stop"}\n{"n": 3}\n')
    async with asyncio.timeout(10):
        await task
    assert out == [{"n": 0}, {"n": 1}, {"n": 2}] and source.bad_lines == 0


async def test_json_lines_follow_mode_ends_on_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "idle.jsonl"
    path.write_bytes(b'{"n": 0}\n')
    p = Pipeline("follow-idle")
    out = p.source("f", JsonLinesSource(path, follow=True, poll_interval=0.02, idle_timeout=0.3)).collect()
    async with asyncio.timeout(5):
        await p.run()
    assert out == [{"n": 0}]


async def test_http_polling_source() -> None:
    polls = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        polls["n"] += 1
        if polls["n"] == 2:
            return web.Response(status=503, text="busy")  # a failed poll is retried, not fatal
        return web.json_response([{"poll": polls["n"], "i": i} for i in range(3)])

    app = web.Application()
    app.router.add_get("/readings", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        source = HttpPollSource(f"http://127.0.0.1:{port}/readings", interval=0.01, max_polls=4)
        p = Pipeline("http")
        out = p.source("http", source).collect()
        await p.run()
    finally:
        await runner.cleanup()
    assert [(r["poll"], r["i"]) for r in out] == [(p, i) for p in (1, 3, 4) for i in range(3)]
    assert source.errors == 1 and source.polls == 4


async def test_zmq_sub_source_with_topics_and_stop() -> None:
    port = free_port()
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        p = Pipeline("zmq")
        source = ZmqSubSource(f"tcp://127.0.0.1:{port}", topics=["temp"], with_topic=True)
        out = p.source("sub", source).collect()
        task = asyncio.create_task(p.run())

        # PUB/SUB drops what is sent before the subscription is up: send a probe until it arrives
        async def probe() -> list[Any]:
            await pub.send_multipart([b"temp", orjson.dumps({"probe": True})])
            return out

        await wait_for(probe, what="a probe through the subscription", timeout=10)
        for i in range(5):
            await pub.send_multipart([b"temp", orjson.dumps({"i": i})])
            await pub.send_multipart([b"humidity", orjson.dumps({"i": i})])  # not subscribed
        await pub.send_multipart([b"temp", orjson.dumps({"control": "stop"})])
        async with asyncio.timeout(5):
            await task
    finally:
        pub.close(linger=0)
    data = [v for topic, v in out if "i" in v]
    assert data == [{"i": i} for i in range(5)]
    assert all(topic == "temp" for topic, _ in out)


async def test_queue_source_acks_after_processing_dead_letters_garbage_and_ends_on_stop() -> None:
    hub = f"qs-{uuid.uuid4().hex[:6]}"
    broker = MemoryBroker(hub)
    await broker.connect()
    await broker.declare("jobs")
    for i in range(5):
        await broker.publish("jobs", encode(Envelope(body={"i": i})))
    await broker.publish("jobs", b"\xff not json")
    await broker.publish("jobs", orjson.dumps({"i": 5}))  # raw JSON from a foreign producer
    await send_stop(broker, "jobs")
    await broker.publish("jobs", encode(Envelope(body={"i": 99})))  # behind the Stop: stays queued
    seen: list[Any] = []

    async def slow(x: Any) -> Any:
        # while a batch is processed its messages are not acked yet: they are in flight, not gone
        q = broker._hub.queues["jobs"]
        seen.append(len(q.in_flight))
        return x

    p = Pipeline("queue-src")
    out = p.source("jobs", QueueSource("jobs")).map(slow).collect()
    await p.run(broker)
    assert [x["i"] for x in out] == [0, 1, 2, 3, 4, 5]
    assert all(n > 0 for n in seen)
    assert await broker.depth("jobs") == 1  # the message behind the Stop
    dlq = broker.consume("jobs.dlq")
    async with asyncio.timeout(5):
        dead = await dlq.__anext__()
    assert "malformed" in dead.headers["x-death-reason"] or "JSON" in dead.headers["x-death-reason"]
    await broker.close()


async def test_queue_source_idle_timeout_and_count_bound() -> None:
    broker = MemoryBroker()
    await broker.connect()
    await broker.declare("q")
    for i in range(10):
        await broker.publish("q", encode(Envelope(body=i)))
    p = Pipeline("queue-bounds")
    out = p.source("q", QueueSource("q", max_items=4)).collect()
    await p.run(broker)
    assert out == [0, 1, 2, 3]
    assert await broker.depth("q") == 6  # nothing beyond the bound was taken
    p2 = Pipeline("queue-idle")
    out2 = p2.source("q", QueueSource("q", idle_timeout=0.3)).collect()
    async with asyncio.timeout(10):
        await p2.run(broker)
    assert out2 == [4, 5, 6, 7, 8, 9]
    await broker.close()


async def test_camera_source_produces_real_image_arrays() -> None:
    camera = SimulatedCamera(64, 48, seed=5)
    p = Pipeline("camera")
    frames = p.source("cam", CameraSource(camera, frames=4)).collect()
    await p.run()
    assert [f["frame"] for f in frames] == [0, 1, 2, 3]
    image = frames[2]["image"]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (48, 64, 3)
    assert SimulatedCamera.frame_number(image) == 2
    assert not np.array_equal(frames[0]["image"], frames[1]["image"])  # the scene moves
    assert image.std() > 10  # a picture, not a blank


def test_bad_source_arguments() -> None:
    from taskstream.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="transport"):
        ZmqSubSource("127.0.0.1:5555")
    with pytest.raises(ConfigurationError, match="idle_timeout"):
        IterableSource([], idle_timeout=0)
    with pytest.raises(ConfigurationError, match="iterable"):
        Pipeline("x").source("s", 42)
