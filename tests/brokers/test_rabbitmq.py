"""RabbitMQ-specific behaviour on the real server: reconnects, interop, quorum queues, fan-out, dead letters, sizes.

Connections are cut with a small TCP proxy owned by each test; the server itself is never stopped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import orjson
import pytest

from taskstream.brokers.base import OutgoingMessage
from taskstream.brokers.rabbitmq import RABBITMQ_MAX_MESSAGE_BYTES, RabbitMQBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import (
    BrokerConnectionError,
    ConfigurationError,
    MessageTooLarge,
    PublishError,
    QueueNotFound,
)
from taskstream.messages import CONTENT_TYPE, Envelope, decode
from taskstream.producer import Producer
from tests.support.cuts import Publisher, cut_rapidly
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.rabbitmq

URL = os.environ.get("TASKSTREAM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
_PARTS = urlsplit(URL)
HOST = _PARTS.hostname or "127.0.0.1"
PORT = _PARTS.port or 5672


def proxy_url(proxy: TcpProxy, **query: object) -> str:
    """The RabbitMQ URL through ``proxy``, with ``query`` as URL options."""
    netloc = f"{_PARTS.username}:{_PARTS.password}@127.0.0.1:{proxy.port}"
    options = "&".join(f"{k}={v}" for k, v in query.items())
    return urlunsplit((_PARTS.scheme, netloc, _PARTS.path or "/", options, ""))


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    p = TcpProxy(PORT, HOST)
    await p.up()
    try:
        yield p
    finally:
        await p.stop()


class Cleanup:
    """Brokers to close and queues to delete after a test."""

    def __init__(self) -> None:
        self.brokers: list[RabbitMQBroker] = []
        self.queues: set[str] = set()

    async def broker(self, url: str = URL, **options: object) -> RabbitMQBroker:
        broker = RabbitMQBroker.from_url(url, **options)
        await broker.connect()
        self.brokers.append(broker)
        return broker

    def name(self, stem: str) -> str:
        queue = f"ts-test-{stem}-{uuid.uuid4().hex[:8]}"
        self.queues.update({queue, f"{queue}.dlq"})
        return queue


@pytest.fixture
async def cleanup() -> AsyncIterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        for broker in c.brokers:
            with contextlib.suppress(Exception):
                await broker.close()
        connection = await aio_pika.connect(URL)
        async with connection:
            for queue in c.queues:
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue, if_unused=False, if_empty=False)
                with contextlib.suppress(Exception):
                    await channel.close()


# -- reconnects --------------------------------------------------------------------------------------------


async def test_cut_connection_under_load_loses_nothing(
    proxy: TcpProxy, cleanup: Cleanup, record_property: pytest.RecordProperty
) -> None:
    total = 2000
    broker = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.3, publish_timeout=60))
    queue = cleanup.name("reconnect")
    await broker.declare(queue)
    processed: list[int] = []

    async def handle(message: Message) -> None:
        processed.append(message.envelope.body)
        await asyncio.sleep(0.001)

    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=50, concurrency=10, max_attempts=100))
    await consumer.start()
    producer = Producer(broker, max_in_flight=4)

    async def produce() -> None:
        for start in range(0, total, 50):
            await producer.send_many(queue, [Envelope(body=i) for i in range(start, start + 50)])
            await asyncio.sleep(0.02)

    publishing = asyncio.create_task(produce())
    await wait_for(lambda: len(processed) >= total // 5, timeout=60, what="first fifth processed")
    assert not publishing.done(), "the cut must come while messages are still being published"
    proxy.cut()  # mid-flight: publishes waiting for confirms and unacked deliveries both

    def half_processed() -> bool:
        if publishing.done() and publishing.exception() is not None:  # a cut must never fail a publish
            raise AssertionError(f"a publish failed: {publishing.exception()!r}")
        return len(set(processed)) >= total // 2

    await wait_for(half_processed, timeout=90, what="half processed after the first cut")
    proxy.cut()
    await publishing  # every publish returned, so the broker confirmed every message
    await wait_for(lambda: len(set(processed)) == total, timeout=120, what=f"all {total} processed")
    await consumer.stop()
    counts = collections.Counter(processed)
    twice = sum(1 for c in counts.values() if c > 1)
    record_property("delivered_twice", twice)
    print(f"\n{total} messages through {proxy.cuts} cuts: {twice} delivered more than once")
    assert set(counts) == set(range(total)), "messages were lost"
    assert consumer.stats.dead_lettered == 0
    assert await broker.depth(queue) == 0, "acked messages are still on the queue"


async def test_publishes_survive_rapid_cuts(proxy: TcpProxy, cleanup: Cleanup) -> None:
    """Sixty cuts 50-100 ms apart while batches are published and consumed: no publish fails, nothing is lost.

    A channel that dies without a reason fails its pending confirms with a bare ``Exception`` (aiormq); that
    must be sent again like any other connection loss, never reach the caller.
    """
    broker = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.1, publish_timeout=60))
    queue = cleanup.name("rapid-cuts")
    await broker.declare(queue)
    seen: set[int] = set()

    async def handle(message: Message) -> None:
        seen.add(message.envelope.body)

    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=50, concurrency=10, max_attempts=1000))
    await consumer.start()
    publisher = Publisher(Producer(broker, max_in_flight=4), queue)
    await cut_rapidly(proxy, 60, publisher.check)
    sent = await publisher.stop()
    await wait_for(lambda: len(seen) == sent, timeout=60, what=f"all {sent} messages consumed")
    await consumer.stop()
    assert seen == set(range(sent))
    assert consumer.failure is None


async def test_publish_waits_for_the_connection_and_consumers_resume(proxy: TcpProxy, cleanup: Cleanup) -> None:
    broker = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.3))
    queue = cleanup.name("resume")
    await broker.declare(queue, topics=[f"{queue}.#"])
    sub = broker.consume(queue, prefetch=5)
    await broker.publish(queue, b"before")
    [first] = [await asyncio.wait_for(sub.__anext__(), 10)]
    await first.ack()
    proxy.cut()
    # published while the connection is down: waits for the reconnect, then is confirmed
    await broker.publish(queue, b"during")
    await broker.publish_topic(f"{queue}.x", b"topic")  # the binding was restored too
    got: set[bytes] = set()
    while not {b"during", b"topic"} <= got:
        d = await asyncio.wait_for(sub.__anext__(), 20)
        got.add(d.body)  # "before" may come again: an ack in flight when the connection broke is lost
        await d.ack()
    assert got <= {b"before", b"during", b"topic"}
    await sub.close()


async def test_unacked_message_of_a_dropped_connection_comes_back_with_attempt_two(
    proxy: TcpProxy, cleanup: Cleanup
) -> None:
    reader = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.3))
    writer = await cleanup.broker()
    queue = cleanup.name("crash")
    await writer.declare(queue)
    await writer.publish(queue, b"held", message_id="m-held")
    sub = reader.consume(queue, prefetch=1)
    held = await asyncio.wait_for(sub.__anext__(), 10)
    assert held.attempt == 1
    proxy.cut()  # the consumer "dies": the server requeues the unacked message itself
    again = await asyncio.wait_for(sub.__anext__(), 20)
    assert (again.body, again.message_id, again.attempt) == (b"held", "m-held", 2)
    await held.ack()  # an ack of the dead channel is ignored (logged), it must not ack the new delivery
    await again.nack(requeue=True)
    third = await asyncio.wait_for(sub.__anext__(), 10)
    assert third.attempt == 3
    await third.ack()
    await sub.close()


async def test_connection_gone_for_good_fails_loudly(proxy: TcpProxy, cleanup: Cleanup) -> None:
    broker = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.2), reconnect_timeout=1.5, publish_timeout=2)
    queue = cleanup.name("gone")
    await broker.declare(queue)
    sub = broker.consume(queue, prefetch=1)
    await broker.publish(queue, b"x")
    await (await asyncio.wait_for(sub.__anext__(), 10)).ack()
    proxy.refuse = True
    proxy.cut()
    with pytest.raises(PublishError) as info:
        await broker.publish(queue, b"lost?")
    assert "within 2" in str(info.value)
    with pytest.raises(BrokerConnectionError) as gone:
        await asyncio.wait_for(sub.__anext__(), 10)
    assert "giving up" in str(gone.value)
    await sub.close()


async def test_unreachable_server_and_bad_url_give_clear_errors_without_secrets() -> None:
    broker = RabbitMQBroker.from_url("amqp://guest:hunter2@127.0.0.1:1/", connect_timeout=3)
    with pytest.raises(BrokerConnectionError) as info:
        await broker.connect()
    assert "hunter2" not in str(info.value) and "127.0.0.1" in str(info.value)
    assert "hunter2" not in repr(broker)
    with pytest.raises(ConfigurationError) as bad:
        RabbitMQBroker.from_url("amqp://guest:hunter2@127.0.0.1/?queue_type=stream")
    assert "queue_type" in str(bad.value) and "hunter2" not in str(bad.value)


# -- interoperability with plain AMQP clients ----------------------------------------------------------------


async def test_plain_client_json_is_consumed_by_a_taskstream_handler(cleanup: Cleanup) -> None:
    queue = cleanup.name("interop-in")
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)  # declared by the other system, no taskstream arguments
        for i in range(3):
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps({"reading": i}), content_type="application/json", headers={"src": "x"}),
                routing_key=queue,
            )
    broker = await cleanup.broker()
    got: list[Message] = []

    async def handle(message: Message) -> None:
        got.append(message)

    consumer = Consumer(broker, queue, handle)
    await consumer.start()  # declares the queue again: its existing arguments are kept
    await wait_for(lambda: len(got) == 3, timeout=20, what="3 plain messages")
    await consumer.stop()
    assert sorted(m.envelope.body["reading"] for m in got) == [0, 1, 2]
    assert all(m.envelope.kind == "raw" for m in got)
    assert got[0].delivery.headers["content_type"] == "application/json"
    assert got[0].delivery.headers["src"] == "x"


async def test_taskstream_message_is_readable_by_a_plain_client(cleanup: Cleanup) -> None:
    queue = cleanup.name("interop-out")
    broker = await cleanup.broker()
    await broker.declare(queue)
    envelope = Envelope(kind="task", body={"x": 1}, correlation_id="corr-9", reply_to="replies", key="k1")
    await Producer(broker).send(queue, envelope)
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=True)
        message = await q.get(timeout=10)
        assert message is not None
        await message.ack()
    assert message.message_id == envelope.id
    assert message.correlation_id == "corr-9"
    assert message.reply_to == "replies"
    assert message.content_type == CONTENT_TYPE
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["ts_kind"] == "task"
    assert decode(message.body).body == {"x": 1}


# -- quorum queues -----------------------------------------------------------------------------------------


async def test_quorum_queue_counts_broker_redeliveries_exactly(proxy: TcpProxy, cleanup: Cleanup) -> None:
    queue = cleanup.name("quorum")
    broker = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.3, queue_type="quorum"))
    await broker.declare(queue)
    # it really is a quorum queue: declaring it classic is refused by the server
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "classic"})
    await broker.publish(queue, b"q", message_id="m-q")
    sub = broker.consume(queue, prefetch=1)
    attempts = []
    for _ in range(2):  # the consumer "dies" twice without acking
        attempts.append((await asyncio.wait_for(sub.__anext__(), 20)).attempt)
        proxy.cut()
    d = await asyncio.wait_for(sub.__anext__(), 20)
    attempts.append(d.attempt)
    await d.nack(requeue=True, delay=0.2)
    d = await asyncio.wait_for(sub.__anext__(), 20)
    attempts.append(d.attempt)
    await d.ack()
    await sub.close()
    assert attempts == [1, 2, 3, 4]
    assert d.message_id == "m-q" and d.body == b"q"


# -- topics, delays, dead letters, sizes ---------------------------------------------------------------------


async def test_topic_fanout_reaches_every_subscriber(cleanup: Cleanup) -> None:
    broker = await cleanup.broker()
    other = await cleanup.broker()
    stem = f"st{uuid.uuid4().hex[:6]}"
    queues = [cleanup.name("fan") for _ in range(3)]
    await broker.declare(queues[0], topics=[f"{stem}.#"])
    await other.declare(queues[1], topics=[f"{stem}.readings.*"])
    await other.declare(queues[2], topics=[f"{stem}.alerts"])
    for i in range(20):
        await broker.publish_topic(f"{stem}.readings.t{i % 2}", str(i).encode(), headers={"i": i})
    await broker.publish_topic(f"{stem}.alerts", b"alert")
    await broker.publish_topic("nobody.listens", b"dropped")  # no bound queue: not an error for pub/sub
    expected = {0: 21, 1: 20, 2: 1}
    for index, queue in enumerate(queues):
        sub = other.consume(queue, prefetch=50)
        got = [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(expected[index])]
        for d in got:
            await d.ack()
        assert all(d.headers["topic"].startswith(stem) for d in got)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sub.__anext__(), 0.5)
        await sub.close()


async def test_short_delay_is_not_stuck_behind_a_long_one(cleanup: Cleanup) -> None:
    broker = await cleanup.broker()
    queue = cleanup.name("delay")
    await broker.declare(queue)
    slow = 4.0
    start = time.monotonic()  # before the call: the server cannot start the delay earlier
    await broker.publish(queue, b"slow", delay=slow)
    await broker.publish(queue, b"fast", delay=0.3)
    await broker.publish(queue, b"now")
    sub = broker.consume(queue, prefetch=5)
    order = []
    for _ in range(2):
        d = await asyncio.wait_for(sub.__anext__(), 15)
        order.append(d.body)
        assert d.attempt == 1
        await d.ack()
    assert order == [b"now", b"fast"]
    # the long delay is kept too: nothing until shortly before it is due (80 % of it, counted from the publish)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sub.__anext__(), max(0.0, start + 0.8 * slow - time.monotonic()))
    d = await asyncio.wait_for(sub.__anext__(), 15)
    assert (d.body, d.attempt) == (b"slow", 1)
    await d.ack()
    await sub.close()


async def test_dead_letters_carry_the_reason(cleanup: Cleanup) -> None:
    broker = await cleanup.broker()
    queue = cleanup.name("dlq")
    dlq = f"{queue}.dlq"

    async def fail(message: Message) -> None:
        raise RuntimeError(f"cannot handle {message.envelope.body}")

    consumer = Consumer(broker, queue, fail, ConsumerConfig(max_attempts=2, retry_delay=0.1))
    await consumer.start()
    await Producer(broker).send(queue, Envelope(body="bad"))
    await wait_for(lambda: consumer.stats.dead_lettered == 1, timeout=20, what="dead letter")
    await consumer.stop()
    # a broker-side reject (nack without requeue) lands in the same queue through the dead-letter exchange
    await broker.publish(queue, b"rejected", headers={"n": 1, "at": 1795664159.8912, "nested": {"f": [0.1, "a"]}})
    sub = broker.consume(queue, prefetch=1)
    d = await asyncio.wait_for(sub.__anext__(), 10)
    await d.nack(requeue=False)
    await sub.close()

    dead_sub = broker.consume(dlq, prefetch=5)
    by_body = {}
    for _ in range(2):
        d = await asyncio.wait_for(dead_sub.__anext__(), 10)
        by_body[d.body] = d
        await d.ack()
    await dead_sub.close()
    runtime = next(d for body, d in by_body.items() if body != b"rejected")
    assert "RuntimeError: cannot handle bad" in runtime.headers["x-death-reason"]
    assert runtime.headers["x-attempts"] == 2 and runtime.headers["x-original-queue"] == queue
    assert "x-ts-attempt" not in runtime.headers
    native = by_body[b"rejected"]
    assert (native.headers["at"], native.headers["nested"]) == (1795664159.8912, {"f": [0.1, "a"]})  # doubles
    assert native.headers["x-first-death-reason"] == "rejected"
    assert native.headers["x-death"][0]["queue"] == queue
    orjson.dumps(native.headers)  # JSON-compatible, timestamps included


async def test_size_limit_from_the_url_and_from_the_server(cleanup: Cleanup) -> None:
    small = await cleanup.broker(max_message_bytes=1000)
    queue = cleanup.name("size")
    await small.declare(queue)
    with pytest.raises(MessageTooLarge) as info:
        await small.publish(queue, b"x" * 1001)
    assert "1000" in str(info.value)
    with pytest.raises(MessageTooLarge):
        await small.publish_batch(queue, [OutgoingMessage(b"ok"), OutgoingMessage(b"y" * 2000)])
    assert await small.depth(queue) == 0, "a batch with an oversized message must send nothing"
    assert RabbitMQBroker.from_url(URL).capabilities.max_message_bytes == RABBITMQ_MAX_MESSAGE_BYTES


@pytest.mark.slow
async def test_server_refusal_of_an_oversized_message_is_mapped(cleanup: Cleanup) -> None:
    # lift the client-side check so the 128 MiB body reaches the server, which refuses it
    broker = await cleanup.broker(max_message_bytes=2 * RABBITMQ_MAX_MESSAGE_BYTES)
    queue = cleanup.name("size-server")
    await broker.declare(queue)
    with pytest.raises(MessageTooLarge) as info:
        await broker.publish(queue, bytes(RABBITMQ_MAX_MESSAGE_BYTES + 1))
    assert str(RABBITMQ_MAX_MESSAGE_BYTES) in str(info.value)
    assert broker.capabilities.max_message_bytes == RABBITMQ_MAX_MESSAGE_BYTES  # learnt from the refusal
    await broker.publish(queue, b"still works")
    assert await broker.depth(queue) == 1


async def test_publish_to_an_undeclared_queue_raises(cleanup: Cleanup) -> None:
    broker = await cleanup.broker()
    with pytest.raises(QueueNotFound):
        await broker.publish(f"ts-test-missing-{uuid.uuid4().hex}", b"x")
    with pytest.raises(QueueNotFound):
        await broker.depth(f"ts-test-missing-{uuid.uuid4().hex}")
    with pytest.raises(QueueNotFound):  # a delayed message would be dropped later: refused now
        await broker.publish(f"ts-test-missing-{uuid.uuid4().hex}", b"x", delay=1)
    sub = broker.consume(f"ts-test-missing-{uuid.uuid4().hex}", prefetch=1)
    with pytest.raises(QueueNotFound):
        await asyncio.wait_for(sub.__anext__(), 10)
    await sub.close()
    queue = cleanup.name("after-error")
    await broker.declare(queue)
    await broker.publish(queue, b"fine")
    assert await broker.depth(queue) == 1


# -- settling and declarations -------------------------------------------------------------------------------


async def test_acks_out_of_order_settle_exactly_the_acked_messages(cleanup: Cleanup) -> None:
    broker = await cleanup.broker()
    queue = cleanup.name("multi-ack")
    await broker.declare(queue)
    await broker.publish_batch(queue, [OutgoingMessage(str(i).encode(), message_id=f"m{i}") for i in range(10)])
    sub = broker.consume(queue, prefetch=10)
    held = {d.body: d for d in [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(10)]}
    await held.pop(b"3").ack()  # out of order, alone: the head of the channel's tags is still unsettled
    await held.pop(b"7").ack()
    await asyncio.gather(*(held.pop(body).ack() for body in (b"1", b"0", b"2", b"5")))  # one loop turn
    await held.pop(b"9").ack()
    assert sorted(held) == [b"4", b"6", b"8"]
    await sub.close()  # gives back what it holds: a copy each, counted as an attempt
    again = broker.consume(queue, prefetch=10)
    back = [await asyncio.wait_for(again.__anext__(), 10) for _ in range(3)]
    assert sorted((d.body, d.message_id, d.attempt) for d in back) == [
        (b"4", "m4", 2),
        (b"6", "m6", 2),
        (b"8", "m8", 2),
    ]
    for d in back:
        await d.ack()
    await again.close()
    assert await broker.depth(queue) == 0, "an acked message came back, or a held one was acked"


async def test_queues_deleted_during_an_outage_are_declared_again_with_their_dead_letter_route(
    proxy: TcpProxy, cleanup: Cleanup
) -> None:
    broker = await cleanup.broker(proxy_url(proxy, reconnect_interval=0.3))
    queue = cleanup.name("replay")
    dlq = f"{queue}.dlq"
    await broker.declare(queue, dead_letter=dlq, topics=[f"{queue}.#"])
    proxy.refuse = True
    proxy.cut()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in (queue, dlq):
            await channel.queue_delete(name, if_unused=False, if_empty=False)
    proxy.refuse = False

    async def dead_lettered() -> bool:
        # the replay may still be running: publish by topic, reject, and look for it in the dead-letter queue
        try:
            await broker.publish_topic(f"{queue}.x", b"replayed")
            if await broker.depth(queue) == 0:
                return False
            sub = broker.consume(queue, prefetch=1)
            await (await asyncio.wait_for(sub.__anext__(), 10)).nack(requeue=False)
            await sub.close()
            return await broker.depth(dlq) > 0
        except QueueNotFound:
            return False

    await wait_for(dead_lettered, timeout=60, interval=0.2, what="a rejected message in the replayed dead-letter queue")
    sub = broker.consume(dlq, prefetch=1)
    d = await asyncio.wait_for(sub.__anext__(), 10)
    assert (d.body, d.headers["x-first-death-reason"]) == (b"replayed", "rejected")
    await d.ack()
    await sub.close()


# -- the package's surface -----------------------------------------------------------------------------------


def test_url_scheme_loads_the_package_and_its_exports_stay() -> None:
    import taskstream.brokers.rabbitmq as package
    from taskstream.brokers.base import broker_from_url

    broker = broker_from_url("amqps://guest:hunter2@127.0.0.1/?queue_type=quorum&heartbeat=5")
    assert isinstance(broker, RabbitMQBroker) and broker.config.queue_type == "quorum"
    assert "hunter2" not in repr(broker)
    assert sorted(package.__all__) == [
        "DEFAULT_PUBLISH_TIMEOUT",
        "DEFAULT_TOPIC_EXCHANGE",
        "DELAY_EXCHANGE",
        "DLX_EXCHANGE",
        "RABBITMQ_MAX_MESSAGE_BYTES",
        "RabbitMQBroker",
        "RabbitMQConfig",
    ]
    assert all(hasattr(package, name) for name in package.__all__)


def test_docs_table_lists_every_url_option_with_its_default() -> None:
    from taskstream.brokers.rabbitmq import RabbitMQConfig

    text = (Path(__file__).parents[2] / "docs" / "brokers.md").read_text()
    section = text.split("## RabbitMQ", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if row.startswith("| `") and len(cells) == 3:
            documented[cells[0].strip("`")] = cells[2].strip("`")
    defaults = RabbitMQConfig()
    assert set(documented) == set(RabbitMQConfig.model_fields)
    for name, shown in documented.items():
        value = getattr(defaults, name)
        expected = (
            str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
        )
        assert shown == expected, f"docs/brokers.md shows {name}={shown}, the default is {value!r}"


async def test_a_refused_admin_call_does_not_fail_the_calls_beside_it(cleanup: Cleanup) -> None:
    """RabbitMQ closes the admin channel when it refuses a call (a depth read of a missing queue): declarations
    made at the same moment on that channel must still succeed (a task client's first submit declares its queue
    while a console or a test reads depths)."""
    broker = await cleanup.broker(URL)
    missing = cleanup.name("missing")
    wanted = [cleanup.name(f"declared-{i}") for i in range(5)]
    calls = [broker.depth(missing), *(broker.declare(q) for q in wanted), broker.depth(missing)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], QueueNotFound) and isinstance(results[-1], QueueNotFound), results
    assert results[1:-1] == [None] * len(wanted), results
    assert [await broker.depth(q) for q in wanted] == [0] * len(wanted)
