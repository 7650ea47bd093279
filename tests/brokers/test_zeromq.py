"""The ZeroMQ backend beyond the contract suite: consumer processes that die or freeze holding messages,
tcp and ipc, device restarts, high-water marks, the topic forwarder and its drop counting, a topic subscriber
fed malformed frames and endless publisher ids by a plain pyzmq socket, the CLI verb.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import zmq
import zmq.asyncio

from taskstream.brokers.base import Broker, OutgoingMessage, broker_from_url
from taskstream.brokers.zeromq import (
    DEFAULT_MAX_STREAMS,
    DeviceConfig,
    DeviceThread,
    Forwarder,
    TopicMessage,
    TopicPublisher,
    TopicSubscriber,
    ZeroMQBroker,
    ZeroMQConfig,
    ZmqDevice,
    endpoint_from_url,
    endpoint_url,
)
from taskstream.errors import BrokerConnectionError, ConfigurationError, QueueNotFound
from tests.brokers.contract.conftest import receive, receive_none
from tests.support.names import unique
from tests.support.ports import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.zmq

# Heartbeats as often as in the liveness tests, but 10 s of silence before the device gives a client up: a
# connection that is not the subject of a test never expires because the machine was slow for a moment.
PATIENT = "?heartbeat=0.2&liveness=50"

# A consumer in its own process: takes every message it can, acks none, reports what it holds, then waits.
HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from taskstream.brokers.base import broker_from_url

    async def main(url, queue, count):
        broker = broker_from_url(url)
        await broker.connect()
        sub = broker.consume(queue, prefetch=count)
        held = [await sub.__anext__() for _ in range(count)]
        print("HELD", " ".join(sorted(d.message_id for d in held)), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.fixture(params=["tcp", "ipc"])
async def device(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ZmqDevice]:
    bind = "tcp://127.0.0.1:*" if request.param == "tcp" else f"ipc://{tmp_path}/device.sock"
    async with ZmqDevice([bind]) as dev:
        yield dev


async def start_holder(url: str, queue: str, count: int, tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url, queue, str(count), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the consumer process did not report the messages it holds")
    assert line.startswith("HELD "), f"consumer process said {line!r}"
    return proc, line


async def test_messages_of_a_killed_consumer_process_go_to_another_consumer(device: ZmqDevice, tmp_path: Path) -> None:
    # A killed process is found by its closed connection (or, at the latest, its 10 s of silence): no liveness
    # window the holder could miss while alive.
    url = endpoint_url(device.endpoints[0]) + PATIENT
    queue = unique("work")
    async with broker_from_url(url) as survivor:
        await survivor.declare(queue)
        ids = [f"m-{i}" for i in range(10)]
        await survivor.publish_batch(queue, [OutgoingMessage(i.encode(), message_id=i) for i in ids])
        proc, line = await start_holder(url, queue, 10, tmp_path)
        try:
            assert line.split()[1:] == sorted(ids)
            assert device.snapshot()["queues"][queue]["unacked"] == 10
            async with survivor.consume(queue, prefetch=20) as sub:
                await receive_none(sub, 0.5)  # all ten are held by the other process
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                again = await receive(sub, 10)
                assert sorted(d.message_id for d in again) == sorted(ids)
                assert {d.attempt for d in again} == {2}
                for d in again:
                    await d.ack()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert device.stats.clients_gone + device.stats.clients_expired >= 1
        assert await survivor.depth(queue) == 0


async def test_messages_of_a_frozen_consumer_return_after_missed_heartbeats(tmp_path: Path) -> None:
    async with ZmqDevice(["tcp://127.0.0.1:*"]) as device:
        endpoint = endpoint_url(device.endpoints[0])
        queue = unique("frozen")
        # Only the frozen holder has a short window (8 missed beats, 1.6 s); the survivor's is 10 s, so the one
        # expiry the test counts is the holder's.
        async with broker_from_url(endpoint + PATIENT) as survivor:
            await survivor.declare(queue)
            await survivor.publish_batch(queue, [OutgoingMessage(b"x", message_id=f"f-{i}") for i in range(3)])
            proc, _ = await start_holder(endpoint + "?heartbeat=0.2&liveness=8", queue, 3, tmp_path)
            try:
                assert device.stats.clients_expired == 0, "the holder expired before it was frozen"
                proc.send_signal(signal.SIGSTOP)  # alive, connection open, but silent
                async with survivor.consume(queue, prefetch=10) as sub:
                    again = await receive(sub, 3)
                    assert {d.attempt for d in again} == {2}
                    for d in again:
                        await d.ack()
            finally:
                proc.kill()
                await proc.wait()
            assert device.stats.clients_expired == 1


async def test_device_restart_replays_declarations_and_subscriptions() -> None:
    bind = f"tcp://127.0.0.1:{free_port()}"
    first = ZmqDevice([bind])
    await first.start()
    url = endpoint_url(bind) + "?heartbeat=0.1&liveness=5"
    queue = unique("survives")
    async with broker_from_url(url) as broker:
        assert isinstance(broker, ZeroMQBroker)
        await broker.declare(queue)
        sub = broker.consume(queue, prefetch=4)
        await broker.publish(queue, b"before")
        [old] = await receive(sub, 1)
        await first.stop()  # the message it held is gone: the device is not durable
        async with ZmqDevice([bind]) as second:

            def replayed() -> bool:
                snapshot = second.snapshot()
                queues = snapshot["queues"]
                return bool(snapshot["clients"]) and queue in queues and queues[queue]["consumers"] > 0

            await wait_for(replayed, timeout=20, what="the declaration and the subscription replayed")
            await old.ack()  # void: that delivery belonged to the old device
            await broker.publish(queue, b"after")
            [new] = await receive(sub, 1)
            assert new.body == b"after"
            assert new.attempt == 1
            await new.ack()
            await sub.close()
            assert await broker.depth(queue) == 0
            assert second.stats.acked == 1


async def test_no_silent_drop_when_high_water_marks_are_reached() -> None:
    # Tiny high-water marks, large bodies, device and consumer sharing one loop: the device's sends hit
    # EAGAIN, frames wait in its per-client backlog, and every message still arrives exactly once.
    config = DeviceConfig(hwm=1, delivery_batch=1)
    async with ZmqDevice(["tcp://127.0.0.1:*"], config) as device:
        broker = ZeroMQBroker(device.endpoints[0], ZeroMQConfig(hwm=1))
        queue = unique("flood")
        async with broker:
            await broker.declare(queue)
            body = b"z" * 64 * 1024
            total = 600
            for start in range(0, total, 200):
                batch = [OutgoingMessage(body, message_id=str(i)) for i in range(start, start + 200)]
                await broker.publish_batch(queue, batch)
            seen: list[str] = []
            async with broker.consume(queue, prefetch=total) as sub:
                for d in await receive(sub, total, timeout=60):
                    seen.append(d.message_id)
                    await d.ack()
            assert sorted(seen, key=int) == [str(i) for i in range(total)]
        assert device.stats.backlogged > 0, "the high-water mark was never reached: the test proved nothing"
        assert device.stats.acked == total


async def test_sustained_load_with_competing_producers_and_consumers_loses_and_duplicates_nothing() -> None:
    # The device on its own thread (its own loop), three producer and three consumer connections; heartbeats
    # (every 0.2 s), replies, deliveries and acks interleave for a while. Every message must be acked exactly
    # once. Two busy event loops sharing one GIL lag each other, so the liveness window is 10 s (PATIENT): an
    # expiry here would be a stall, not a slow machine.
    device = DeviceThread(["tcp://127.0.0.1:*"]).start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            url = device.url + PATIENT
            producers = [await stack.enter_async_context(broker_from_url(url)) for _ in range(3)]
            consumers = [await stack.enter_async_context(broker_from_url(url)) for _ in range(3)]
            queue = unique("load")
            await producers[0].declare(queue)
            per_producer, seen = 10_000, collections.Counter[str]()
            total = 3 * per_producer

            async def produce(broker: Broker, p: int) -> None:
                for start in range(0, per_producer, 500):
                    batch = [OutgoingMessage(b"x" * 64, message_id=f"{p}-{i}") for i in range(start, start + 500)]
                    await broker.publish_batch(queue, batch)

            async def consume(broker: Broker) -> None:
                async with broker.consume(queue, prefetch=300) as sub:
                    async for delivery in sub:
                        await delivery.ack()
                        seen[delivery.message_id] += 1

            consuming = [asyncio.create_task(consume(b)) for b in consumers]
            try:
                async with asyncio.timeout(120):
                    await asyncio.gather(*(produce(b, p) for p, b in enumerate(producers)))
                await wait_for(lambda: sum(seen.values()) >= total, timeout=120, what=f"{total} acked deliveries")
            finally:
                for task in consuming:
                    task.cancel()
                failures = [r for r in await asyncio.gather(*consuming, return_exceptions=True) if r is not None]
            assert all(isinstance(r, asyncio.CancelledError) for r in failures), failures
            assert len(seen) == total
            assert set(seen.values()) == {1}, f"{sum(seen.values()) - len(seen)} duplicates"
            assert await producers[0].depth(queue) == 0
            snapshot = device.call(lambda: device.device.snapshot() if device.device else {})
            assert snapshot["acked"] == total and snapshot["in_flight"] == 0
            assert snapshot["clients_expired"] == 0
    finally:
        device.stop()


async def test_publish_to_an_undeclared_queue_and_a_missing_device_fail_clearly() -> None:
    nowhere = unique("nowhere")
    async with ZmqDevice(["tcp://127.0.0.1:*"]) as device, ZeroMQBroker(device.endpoints[0]) as broker:
        with pytest.raises(QueueNotFound, match=nowhere):
            await broker.publish(nowhere, b"x")
        sub = broker.consume(nowhere, prefetch=1)
        with pytest.raises(QueueNotFound):
            await sub.__anext__()
        await sub.close()
    lonely = ZeroMQBroker.from_url(f"zmq://127.0.0.1:{free_port()}?request_timeout=0.5")
    with pytest.raises(BrokerConnectionError, match="did not answer"):
        await lonely.connect()


def test_url_forms() -> None:
    assert endpoint_from_url("zmq://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert endpoint_from_url("zmq://ipc/tmp/ts.sock") == "ipc:///tmp/ts.sock"
    assert endpoint_url("ipc:///tmp/ts.sock") == "zmq://ipc/tmp/ts.sock"
    broker = broker_from_url("zmq://localhost:7000?heartbeat=0.5&liveness=4&request_timeout=3")
    assert isinstance(broker, ZeroMQBroker)
    assert broker.endpoint == "tcp://localhost:7000"
    assert broker.config.heartbeat_interval == 0.5 and broker.config.heartbeat_liveness == 4
    assert broker.capabilities.durable is False and broker.capabilities.visibility_timeout is None
    for bad, why in [
        ("zmq://localhost", "HOST:PORT"),
        ("zmq://ipc/", "socket path"),
        ("zmq://h:1?heartbeat=-1", "heartbeat='-1' is not a valid value"),
        ("zmq://h:1?request_timeout=0", "greater than 0"),
        ("zmq://h:1?colour=blue", "unknown zmq URL parameter 'colour'"),
        ("zmq://h:1?livenes=3", r"'livenes' \(did you mean 'liveness'\?\) in 'zmq://h:1\?livenes=\*\*\*'"),
    ]:
        with pytest.raises(ConfigurationError, match=why):
            broker_from_url(bad)


# -- topic pub/sub through the forwarder ----------------------------------------------------------------


@pytest.fixture(params=["tcp", "ipc"])
async def forwarder(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Forwarder]:
    if request.param == "tcp":
        front, back = "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"
    else:
        front, back = f"ipc://{tmp_path}/front.sock", f"ipc://{tmp_path}/back.sock"
    async with Forwarder(front, back) as fwd:
        yield fwd


async def take(subscriber: TopicSubscriber, n: int, timeout: float = 20.0) -> list[TopicMessage]:
    got: list[TopicMessage] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got) < n:
                got.append(await subscriber.recv())
    except TimeoutError:
        pytest.fail(f"expected {n} topic messages, got {len(got)}")
    return got


async def test_forwarder_delivers_by_prefix_in_order(forwarder: Forwarder) -> None:
    async with (
        TopicSubscriber(forwarder.backend_endpoint, ["sensor."]) as sensors,
        TopicSubscriber(forwarder.backend_endpoint, ["sensor.1"], exact=True) as one,
        TopicPublisher(forwarder.frontend_endpoint, name="p1") as pub,
    ):
        await pub.wait_subscribed("sensor.1", "sensor.2")
        for i in range(100):
            for topic in ("sensor.1", "sensor.2", "sensor.10", "other"):
                assert await pub.publish(topic, str(i).encode(), headers={"i": i})
        got = await take(sensors, 300)
        assert {m.topic for m in got} == {"sensor.1", "sensor.2", "sensor.10"}
        for topic in ("sensor.1", "sensor.2", "sensor.10"):
            assert [int(m.body) for m in got if m.topic == topic] == list(range(100))
        mine = await take(one, 100)
        assert [(m.topic, m.headers["i"], m.publisher, m.seq) for m in mine] == [
            ("sensor.1", i, "p1", i + 1) for i in range(100)
        ]
        assert sensors.missed == one.missed == pub.dropped == forwarder.stats.dropped == 0
        assert forwarder.stats.subscriptions.keys() >= {b"sensor.", b"sensor.1"}


async def test_pub_drops_are_counted_at_each_hop_and_seen_by_the_subscriber() -> None:
    # A subscriber that does not read, tiny high-water marks: messages must be dropped somewhere, and every
    # drop must show up in a counter (publisher or forwarder) and as a gap at the subscriber.
    async with (
        Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", hwm=2) as fwd,
        TopicSubscriber(fwd.backend_endpoint, ["t"], hwm=2) as sub,
        TopicPublisher(fwd.frontend_endpoint, hwm=2) as pub,
    ):
        await pub.wait_subscribed("t")
        body = b"d" * 64 * 1024
        sent = 0
        while pub.dropped + fwd.stats.dropped == 0 and sent < 20_000:
            await pub.publish("t", body)
            sent += 1
            if sent % 20 == 0:
                await asyncio.sleep(0)  # let the forwarder run
        assert pub.dropped + fwd.stats.dropped > 0, "nothing was dropped: the test proved nothing"
        # Read until every message sent is either received or counted as dropped (a drop no counter saw never
        # lets this finish); then the pipes are empty and the last message cannot be dropped.
        received = 0

        async def read() -> None:
            nonlocal received
            while True:
                await sub.recv()
                received += 1

        reader = asyncio.create_task(read())
        try:
            await wait_for(
                lambda: received + pub.dropped + fwd.stats.dropped == sent,
                timeout=30,
                what="every message received or counted as dropped",
            )
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        pub.on_full = "block"
        await pub.publish("t", b"last")  # a gap before it reveals drops after the last one read
        sent += 1
        last = await take(sub, 1)
        received += 1
        assert last[0].body == b"last"
        assert sub.missed > 0
        assert sub.missed == pub.dropped + fwd.stats.dropped
        assert received + sub.missed == sent


@contextlib.asynccontextmanager
async def plain_pub(
    topics: list[str], max_streams: int = DEFAULT_MAX_STREAMS
) -> AsyncIterator[tuple[zmq.asyncio.Socket, TopicSubscriber]]:
    """A plain pyzmq XPUB bound on a free port and a TopicSubscriber connected to it, once its filters arrived."""
    pub = zmq.asyncio.Context.instance().socket(zmq.XPUB)  # XPUB: a PUB that also reads the subscriptions
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    try:
        subscriber = TopicSubscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT), topics, max_streams=max_streams)
        async with subscriber:
            async with asyncio.timeout(20):
                for _ in topics:
                    assert (await pub.recv())[:1] == b"\x01"  # one subscribe message per filter
            yield pub, subscriber
    finally:
        pub.close(0)


def header(publisher: object, seq: object, headers: object = None) -> bytes:
    return orjson.dumps([publisher, seq, {} if headers is None else headers])


MALFORMED: list[tuple[str, list[bytes]]] = [
    ("frames", [b"t", header("p", 1), b"body", b"one too many"]),
    ("header", [b"t", b"not json", b"body"]),
    ("header", [b"t", b"\xff\xfe", b"body"]),
    ("header shape", [b"t", orjson.dumps({"publisher": "p", "seq": 1, "headers": {}}), b"body"]),
    ("header shape", [b"t", orjson.dumps(["p", 1]), b"body"]),
    ("header shape", [b"t", b"42", b"body"]),
    ("header types", [b"t", header("p", "7"), b"body"]),
    ("header types", [b"t", header(["p"], 1), b"body"]),
    ("header types", [b"t", header("p", 1.5), b"body"]),
    ("header types", [b"t", header("p", True), b"body"]),
    ("header types", [b"t", header("p", 0), b"body"]),
    ("header types", [b"t", header("p", 1, ["not", "a", "dict"]), b"body"]),
    ("topic", [b"t\xff", header("p", 1), b"body"]),
    ("topic", [b"t\xc3", b"plain two-frame body"]),
]


async def test_topic_subscriber_skips_each_kind_of_malformed_message_and_delivers_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each broken message is followed by a valid one from a well-behaved publisher: every valid one must come
    # out, in order, and the iteration must go on (it used to end with TypeError on the first wrong seq type).
    caplog.set_level(logging.WARNING, logger="taskstream.zmq")
    async with plain_pub(["t"]) as (pub, subscriber):
        for i, (_, frames) in enumerate(MALFORMED):
            await pub.send_multipart(frames)
            await pub.send_multipart([b"t", header("good", i + 1, {"i": i}), str(i).encode()])
        got = await take(subscriber, len(MALFORMED))
    assert [(m.topic, m.publisher, m.seq, m.headers, m.body) for m in got] == [
        ("t", "good", i + 1, {"i": i}, str(i).encode()) for i in range(len(MALFORMED))
    ]
    assert subscriber.malformed == len(MALFORMED)
    assert subscriber.received == len(MALFORMED)
    assert subscriber.missed == 0
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == len({kind for kind, _ in MALFORMED}), warnings  # one per kind, not one per message


async def test_topic_subscriber_async_for_survives_a_wrong_seq_type() -> None:
    async with plain_pub([""]) as (pub, subscriber):
        await pub.send_multipart([b"a", header("p", "1"), b"hostile"])
        await pub.send_multipart([b"a", header("p", 1), b"fine"])
        async with asyncio.timeout(20):
            async for message in subscriber:
                assert message.body == b"fine"
                break
    assert subscriber.malformed == 1


async def test_topic_subscriber_remembers_a_bounded_number_of_streams() -> None:
    # Publisher ids are the sender's choice: a flood of new ones must not grow the subscriber's memory.
    async with plain_pub(["t"], max_streams=8) as (pub, subscriber):
        for p in range(200):
            await pub.send_multipart([b"t", header(f"pub-{p}", 1), b"x"])
        await take(subscriber, 200)
        assert subscriber.tracked_streams == 8
        # a stream still remembered has its gaps counted; one forgotten and back is not mistaken for losses
        await pub.send_multipart([b"t", header("pub-199", 5), b"x"])
        await pub.send_multipart([b"t", header("pub-0", 2), b"x"])
        await pub.send_multipart([b"t", header("pub-0", 4), b"x"])
        await take(subscriber, 3)
    assert subscriber.missed == 3 + 1
    assert subscriber.tracked_streams == 8
    assert subscriber.malformed == 0


def test_topic_subscriber_refuses_a_bad_stream_bound() -> None:
    for bad in (0, -1, True):
        with pytest.raises(ConfigurationError, match="max_streams"):
            TopicSubscriber("tcp://127.0.0.1:1", ["t"], max_streams=bad)


# -- the command line ---------------------------------------------------------------------------------------


async def test_cli_runs_device_and_forwarder_until_sigterm(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("taskstream")
    command = [str(exe)] if exe.exists() else [sys.executable, "-c", "from taskstream.cli import main; main()"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        "zmq-device",
        "--bind",
        "tcp://127.0.0.1:*",
        "--bind",
        f"ipc://{tmp_path}/cli.sock",
        "--pubsub-frontend",
        "tcp://127.0.0.1:*",
        "--pubsub-backend",
        "tcp://127.0.0.1:*",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while len(lines) < 4:
                line = (await proc.stdout.readline()).decode()
                assert line, f"zmq-device exited early: {lines}"
                lines.append(line.strip())
        urls = [line.split("brokers use ")[1].rstrip(")") for line in lines if "brokers use" in line]
        assert [u.split("://")[1].split("/")[0].split(":")[0] for u in urls] == ["127.0.0.1", "ipc"]
        front = next(line.split("-> ")[1] for line in lines if "publishers ->" in line)
        back = next(line.split("-> ")[1] for line in lines if "subscribers ->" in line)
        for url in urls:
            queue = unique("cli")
            async with broker_from_url(url) as broker:
                await broker.declare(queue)
                await broker.publish(queue, url.encode())
                async with broker.consume(queue, prefetch=1) as sub:
                    [d] = await receive(sub, 1)
                    assert d.body == url.encode()
                    await d.ack()
        async with TopicSubscriber(back, ["x"]) as tsub, TopicPublisher(front) as tpub:
            await tpub.wait_subscribed("x")
            await tpub.publish("x", b"through the cli forwarder")
            [m] = await take(tsub, 1)
            assert m.body == b"through the cli forwarder"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
