"""SQS-specific behaviour on moto's server: FIFO groups, visibility heartbeats, native redrive, size limits, interop.

moto hands the same message to two concurrent receivers now and then (see ``/work/shared/SERVICES.md``), so
tests with competing consumers count duplicates instead of asserting exactly-once; "ran once" is asserted
where one consumer holds the message, which is where the SQS contract promises it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import importlib.util
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from aiobotocore.session import get_session

from taskstream.brokers.base import Broker, OutgoingMessage, broker_from_url
from taskstream.brokers.sqs import DEFAULT_GROUP, SQSBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import BrokerConnectionError, ConfigurationError, MessageTooLarge, NotSupported, QueueNotFound
from taskstream.messages import Envelope
from taskstream.producer import Producer
from tests.brokers.contract.backends.sqs import ENDPOINT, make
from tests.brokers.contract.conftest import receive as take
from tests.brokers.contract.conftest import receive_none as nothing
from tests.support.names import unique
from tests.support.ports import free_port
from tests.support.require import unavailable
from tests.support.waiting import wait_for, wait_until

pytestmark = pytest.mark.sqs

MakeBroker = Callable[..., Awaitable[SQSBroker]]

# moto gets FIFO groups wrong in two ways real SQS does not: (1) its receive is not atomic, so two receives
# at the same instant (two consumers) can split one group between them, out of order; (2) a long poll keeps
# the snapshot of locked groups it took when it started, so it can hand out a group's next message while
# earlier ones are in flight, or wait its whole wait_time after a group unlocks. FIFO tests therefore
# short-poll (fixes 2) against a moto of their own that serves one request at a time (fixes 1), unless
# TASKSTREAM_TEST_SQS_ENDPOINT names another server.
FIFO_WAIT = 0
_SERIAL_MOTO = """
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False,
           request_handler=MotoRequestHandler)
"""


@pytest.fixture(scope="module")
def fifo_endpoint() -> Iterator[str]:
    """An SQS endpoint whose receives are atomic: the configured server, or a one-request-at-a-time moto."""
    if os.environ.get("TASKSTREAM_TEST_SQS_ENDPOINT"):
        yield ENDPOINT
        return
    if importlib.util.find_spec("moto") is None:
        unavailable("moto is not installed: the serial moto server for the FIFO tests cannot run")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", _SERIAL_MOTO, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if server.poll() is not None:
            pytest.fail(f"the serial moto server on port {port} exited with {server.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_until(answers, timeout=20, interval=0.1, what=f"the serial moto server on port {port}")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
async def new_broker() -> AsyncIterator[MakeBroker]:
    """Connected brokers on moto (``make(**options)``); closed, and their queues deleted, after the test."""
    made: list[SQSBroker] = []

    async def factory(**options: Any) -> SQSBroker:
        broker = make(**options)
        assert isinstance(broker, SQSBroker)
        await broker.connect()
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        await broker.close()
    if made:
        cleaner = made[0]
        await cleaner.connect()
        for name in {name for broker in made for name in broker._queues}:
            try:
                await cleaner.delete_queue(name)
            except Exception:
                pass
        await cleaner.close()


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    """A plain aiobotocore SQS client on the same server (a foreign producer, or queues made elsewhere)."""
    async with get_session().create_client("sqs", region_name="us-east-1", endpoint_url=ENDPOINT) as client:
        yield client


async def in_flight(broker: SQSBroker, queue: str, raw: Any) -> tuple[int, int]:
    """(visible, not visible) message counts of ``queue`` straight from the server."""
    url = (await raw.get_queue_url(QueueName=broker.sqs_name(queue)))["QueueUrl"]
    attributes = (
        await raw.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


# -- FIFO ------------------------------------------------------------------------------------------------


async def test_fifo_keeps_order_within_each_group_across_two_consumers(
    new_broker: MakeBroker, fifo_endpoint: str
) -> None:
    first = await new_broker(wait_time=FIFO_WAIT, endpoint_url=fifo_endpoint)
    second = await new_broker(wait_time=FIFO_WAIT, endpoint_url=fifo_endpoint)
    queue = unique("fifo") + ".fifo"
    await first.declare(queue, fifo=True)
    groups, per_group = 4, 50
    arrivals: dict[str, list[int]] = collections.defaultdict(list)
    trace: dict[str, list[str]] = collections.defaultdict(list)
    by_consumer: collections.Counter[str] = collections.Counter()
    keys_seen: set[tuple[str | None, str]] = set()

    def handler(name: str) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            body = message.envelope.body
            assert isinstance(body, dict)
            arrivals[body["g"]].append(body["i"])  # recorded on arrival, before any await
            trace[body["g"]].append(f"{name[0]}{body['i']}")
            by_consumer[name] += 1
            keys_seen.add((message.delivery.key, body["g"]))
            await asyncio.sleep(0.01)

        return handle

    config = ConsumerConfig(prefetch=10, concurrency=10)
    consumers = [
        Consumer(first, queue, handler("first"), config),
        Consumer(second, queue, handler("second"), config),
    ]
    envelopes = [Envelope(body={"g": f"g{g}", "i": i}, key=f"g{g}") for i in range(per_group) for g in range(groups)]
    await Producer(first).send_many(queue, envelopes)
    for consumer in consumers:
        await consumer.start()
    await wait_for(
        lambda: sum(len(set(seq)) for seq in arrivals.values()) == groups * per_group, what="all 200 messages"
    )
    for consumer in consumers:
        await consumer.stop()

    duplicates = sum(len(seq) - len(set(seq)) for seq in arrivals.values())
    for group, seq in arrivals.items():
        first_arrivals = list(dict.fromkeys(seq))  # moto may repeat a message; order counts first arrivals
        assert first_arrivals == list(range(per_group)), (
            f"group {group} out of order: {trace[group]} ({duplicates} dup)"
        )
    assert all(key == group for key, group in keys_seen), f"keys did not travel: {keys_seen}"
    assert set(by_consumer) == {"first", "second"}, f"one consumer did everything: {dict(by_consumer)}"


async def test_fifo_publish_batch_keeps_order_and_unkeyed_messages_share_the_default_group(
    new_broker: MakeBroker,
) -> None:
    broker = await new_broker(wait_time=FIFO_WAIT)
    queue = unique("fifob") + ".fifo"
    await broker.declare(queue)  # the .fifo name alone makes a FIFO queue
    await broker.publish_batch(queue, [OutgoingMessage(str(i).encode()) for i in range(25)])
    got: list[int] = []
    async with broker.consume(queue, prefetch=10) as sub:
        while len(got) < 25:
            [delivery] = await take(sub, 1)
            assert delivery.key is None
            got.append(int(delivery.body))
            await delivery.ack()
    assert got == list(range(25))
    info = broker._queues[queue]
    assert info.fifo
    assert DEFAULT_GROUP == "default"


async def test_fifo_deduplicates_by_message_id(new_broker: MakeBroker) -> None:
    broker = await new_broker(wait_time=FIFO_WAIT)
    queue = unique("dedup") + ".fifo"
    await broker.declare(queue)
    await broker.publish(queue, b"once", message_id="same-id", key="k")
    await broker.publish(queue, b"once", message_id="same-id", key="k")
    await broker.publish(queue, b"other", message_id="other-id", key="k")
    async with broker.consume(queue, prefetch=10) as sub:
        got = await take(sub, 2)
        assert [d.body for d in got] == [b"once", b"other"]
        for d in got:
            await d.ack()
        await nothing(sub, 1.5)


async def test_fifo_refuses_per_message_delay_and_fifo_flag_needs_the_suffix(new_broker: MakeBroker) -> None:
    broker = await new_broker()
    queue = unique("fifod") + ".fifo"
    await broker.declare(queue)
    with pytest.raises(NotSupported, match="per-message delay"):
        await broker.publish(queue, b"x", delay=5)
    with pytest.raises(ConfigurationError, match=r"\.fifo"):
        await broker.declare(unique("nofifo"), fifo=True)


# -- visibility ------------------------------------------------------------------------------------------


async def test_handler_running_two_visibility_timeouts_runs_once(
    new_broker: MakeBroker, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # 3 s visibility: the heartbeat (every second, back to 3 s) has 2 s to spare for a slow moto; the handler
    # runs two visibility timeouts, so without the heartbeat the rival gets the message in its first one.
    broker = await new_broker(visibility_timeout=3)
    rival_broker = await new_broker(visibility_timeout=3)
    queue = unique("slow")
    await broker.declare(queue)
    timeout = broker.capabilities.visibility_timeout
    assert timeout == 3
    runs: list[tuple[str, int]] = []
    caplog.set_level(logging.WARNING, logger="taskstream.consumer")

    def slow(name: str) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            runs.append((name, message.delivery.attempt))
            await asyncio.sleep(timeout * 2)  # the work itself: it outlives the visibility timeout

        return handle

    consumer = Consumer(broker, queue, slow("holder"), ConsumerConfig(prefetch=1, concurrency=1))
    await broker.publish(queue, Envelope(body="slow").to_bytes())
    await consumer.start()
    await wait_for(lambda: len(runs) == 1, what="the first run")
    # Only now a rival polls: it would get the message the moment its visibility lapsed.
    rival = Consumer(rival_broker, queue, slow("rival"), ConsumerConfig(prefetch=1, concurrency=1))
    await rival.start()
    await wait_for(lambda: consumer.stats.acked == 1, what="the slow handler to finish")
    # Deleted, not only hidden: a failed delete would leave it on the queue, invisible, and back later.
    assert await in_flight(broker, queue, raw) == (0, 0)
    await consumer.stop()
    await rival.stop()
    assert runs == [("holder", 1)]
    assert not [r for r in caplog.records if "heartbeat" in r.getMessage()], caplog.text


async def test_messages_waiting_behind_a_slow_handler_keep_their_first_attempt(
    new_broker: MakeBroker, raw: Any
) -> None:
    # 3 s visibility: the buffer's keep-alive and the handler's heartbeat have 2 s to spare for a slow moto.
    broker = await new_broker(visibility_timeout=3)
    queue = unique("waiting")
    await broker.declare(queue)
    runs: list[tuple[int, int]] = []

    async def handle(message: Message) -> None:
        runs.append((int(message.envelope.body), message.delivery.attempt))  # type: ignore[call-overload]
        await asyncio.sleep(3.5)  # longer than the visibility timeout, while the others wait their turn

    # prefetch 4, one handler at a time: messages 1 and 2 wait 3.5 and 7 s, received but not running.
    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=4, concurrency=1))
    await Producer(broker).send_many(queue, [Envelope(body=i) for i in range(3)])
    await consumer.start()
    await wait_for(lambda: consumer.stats.acked == 3, what="three messages")
    # A copy that lapsed and was received again would still be on the queue (held or visible): none is.
    assert await in_flight(broker, queue, raw) == (0, 0)
    await consumer.stop()
    assert sorted(runs) == [(0, 1), (1, 1), (2, 1)], f"a waiting message lapsed and ran again: {runs}"


async def test_close_returns_held_messages_at_once(new_broker: MakeBroker) -> None:
    broker = await new_broker()  # visibility timeout 30 s: anything back sooner was returned by close()
    queue = unique("close")
    await broker.declare(queue)
    await broker.publish_batch(queue, [OutgoingMessage(str(i).encode()) for i in range(5)])
    sub = broker.consume(queue, prefetch=5)
    handed = await take(sub, 3)
    assert all(d.attempt == 1 for d in handed)
    await sub.close()
    await handed[0].ack()  # settled by close: a later ack is ignored, the message stays on the queue
    async with broker.consume(queue, prefetch=5) as again:
        got = await take(again, 5, timeout=15)
        assert sorted(int(d.body) for d in got) == [0, 1, 2, 3, 4]
        attempts = {int(d.body): d.attempt for d in got}
        assert all(attempts[int(d.body)] == 2 for d in handed), attempts
        for d in got:
            await d.ack()


async def absent_until(sub: Any, start: float, hidden: float) -> None:
    """Nothing delivered until shortly before ``hidden`` seconds counted from ``start`` pass (80 % of them)."""
    await nothing(sub, max(0.0, start + 0.8 * hidden - time.monotonic()))


async def test_extend_and_nack_delay_map_onto_visibility(new_broker: MakeBroker) -> None:
    broker = await new_broker(visibility_timeout=2)
    queue = unique("extend")
    await broker.declare(queue)
    await broker.publish(queue, b"e")
    async with broker.consume(queue, prefetch=1) as sub:
        [held] = await take(sub, 1)
        start = time.monotonic()  # before the call: the server cannot start the 6 s earlier
        await held.extend(6)  # hidden for 6 s from now, well past the 2 s timeout
        await absent_until(sub, start, 6)
        [back] = await take(sub, 1, timeout=15)
        assert back.attempt == 2
        start = time.monotonic()
        await back.nack(requeue=True, delay=3)
        await absent_until(sub, start, 3)
        [third] = await take(sub, 1, timeout=15)
        assert third.attempt == 3
        await third.ack()


# -- dead letters ----------------------------------------------------------------------------------------


async def test_native_redrive_moves_a_message_received_too_often(new_broker: MakeBroker, raw: Any) -> None:
    broker = await new_broker(max_receive_count=2)
    queue = unique("redrive")
    dead = broker.dead_letter_name(queue)
    assert dead == f"{queue}-dlq"
    await broker.declare(queue)  # made without a dead-letter queue ...
    await broker.declare(queue, dead_letter=dead)  # ... declare adds the RedrivePolicy (and the DLQ)
    url = (await raw.get_queue_url(QueueName=broker.sqs_name(queue)))["QueueUrl"]
    policy = (await raw.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"]))["Attributes"]
    assert '"maxReceiveCount":2' in policy["RedrivePolicy"].replace(" ", "")
    await broker.publish(queue, b"poison", headers={"origin": "sensor-3"}, message_id="p-1")
    async with broker.consume(queue, prefetch=1) as sub:
        for attempt in (1, 2):  # a consumer that takes it and never settles it (crash, hang)
            [delivery] = await take(sub, 1)
            assert delivery.attempt == attempt
            await delivery.nack(requeue=True)
        await nothing(sub, 2.0)  # the third receive moved it instead of delivering it
    async with broker.consume(dead, prefetch=1) as sub:
        [moved] = await take(sub, 1)
        assert moved.body == b"poison"
        assert moved.message_id == "p-1"
        assert moved.headers["origin"] == "sensor-3"
        assert "x-death-reason" not in moved.headers  # SQS moves it without a reason; the runtime adds one
        await moved.ack()


async def test_runtime_dead_letter_carries_the_reason_to_the_sqs_dlq(new_broker: MakeBroker) -> None:
    broker = await new_broker()
    queue = unique("reason")
    consumer = Consumer(broker, queue, _fail, ConsumerConfig(max_attempts=2, retry_delay=0.1))
    await consumer.start()  # declares <queue>-dlq and the RedrivePolicy (maxReceiveCount 5 > max_attempts)
    await broker.publish(queue, Envelope(body=1).to_bytes())
    await wait_for(lambda: consumer.stats.dead_lettered == 1, what="the dead-letter")
    await consumer.stop()
    async with broker.consume(broker.dead_letter_name(queue), prefetch=1) as sub:
        [dead] = await take(sub, 1)
        assert "boom" in str(dead.headers["x-death-reason"])
        assert dead.headers["x-attempts"] == 2
        await dead.ack()


async def _fail(message: Message) -> None:
    raise RuntimeError("boom")


# -- sizes and bodies ------------------------------------------------------------------------------------


async def test_size_limit_comes_from_the_queue(new_broker: MakeBroker, raw: Any) -> None:
    broker = await new_broker(create_queues=False)
    queue = unique("small")
    await raw.create_queue(QueueName=broker.sqs_name(queue), Attributes={"MaximumMessageSize": "2048"})
    await broker.declare(queue)  # looked up, not created: its limit is 2048 bytes
    await broker.publish(queue, b"x" * 1500)
    with pytest.raises(MessageTooLarge, match="2048") as info:
        await broker.publish(queue, b"x" * 2100)
    assert broker.sqs_name(queue) in str(info.value)
    with pytest.raises(MessageTooLarge):  # binary bodies travel as base64: 1600 bytes become 2136
        await broker.publish(queue, bytes(1600))
    with pytest.raises(MessageTooLarge):  # headers count too
        await broker.publish(queue, b"x" * 1900, headers={"note": "y" * 300})
    with pytest.raises(MessageTooLarge):  # a batch is checked whole before anything is sent
        await broker.publish_batch(queue, [OutgoingMessage(b"ok"), OutgoingMessage(b"x" * 3000)])
    async with broker.consume(queue, prefetch=10) as sub:
        [only] = await take(sub, 1)
        assert only.body == b"x" * 1500
        await only.ack()
        await nothing(sub, 1.0)


async def test_binary_bodies_and_header_types_round_trip(new_broker: MakeBroker) -> None:
    broker = await new_broker()
    queue = unique("bin")
    await broker.declare(queue)
    bodies = [bytes(range(256)), b"line\r\nbreak", "ünïcødé ✓".encode(), b""]
    headers = {"n": 3, "f": 1.5, "flag": True, "items": ["a", 1], "content_type": "application/octet-stream"}
    for body in bodies:
        await broker.publish(queue, body, headers=headers, key="k-1")
    async with broker.consume(queue, prefetch=10) as sub:
        got = await take(sub, len(bodies))
        assert sorted(d.body for d in got) == sorted(bodies)
        for d in got:
            assert d.headers == headers
            assert d.key == "k-1"
            await d.ack()


async def test_plain_sqs_producers_are_read(new_broker: MakeBroker, raw: Any) -> None:
    broker = await new_broker()
    queue, fifo = unique("plain"), unique("plainf") + ".fifo"
    await broker.declare(queue)
    await broker.declare(fifo)
    url = (await raw.get_queue_url(QueueName=broker.sqs_name(queue)))["QueueUrl"]
    await raw.send_message(
        QueueUrl=url,
        MessageBody='{"reading": 21.5}',
        MessageAttributes={
            "source": {"DataType": "String", "StringValue": "legacy"},
            "count": {"DataType": "Number", "StringValue": "7"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    )
    fifo_url = (await raw.get_queue_url(QueueName=broker.sqs_name(fifo)))["QueueUrl"]
    await raw.send_message(QueueUrl=fifo_url, MessageBody="{}", MessageGroupId="dev-9", MessageDeduplicationId="d1")
    async with broker.consume(queue, prefetch=1) as sub:
        [d] = await take(sub, 1)
        assert d.body == b'{"reading": 21.5}'
        assert d.headers == {"source": "legacy", "count": 7, "blob": base64.b64encode(b"\x00\x01").decode()}
        assert d.message_id  # SQS's own id when the producer gave none
        await d.ack()
    async with broker.consume(fifo, prefetch=1) as sub:
        [d] = await take(sub, 1)
        assert d.key == "dev-9"  # a plain FIFO producer's group is the key
        await d.ack()

    handled: list[object] = []

    async def handle(message: Message) -> None:
        handled.append(message.envelope.body)

    consumer = Consumer(broker, queue, handle)
    await consumer.start()
    await raw.send_message(QueueUrl=url, MessageBody='{"reading": 22.0}')
    await wait_for(lambda: handled == [{"reading": 22.0}], what="the raw message through the runtime")
    await consumer.stop()


# -- configuration ---------------------------------------------------------------------------------------


def test_url_parameters_and_their_errors() -> None:
    broker = broker_from_url(
        f"sqs://eu-west-1/?endpoint_url={quote(ENDPOINT, safe='')}&queue_prefix=dev-&visibility_timeout=45"
        "&wait_time=5&max_receive_count=7&create_queues=false"
    )
    assert isinstance(broker, SQSBroker)
    options = broker.options
    assert (options.region, options.endpoint_url, options.queue_prefix) == ("eu-west-1", ENDPOINT, "dev-")
    assert (options.visibility_timeout, options.wait_time, options.max_receive_count) == (45.0, 5, 7)
    assert options.create_queues is False
    assert broker.capabilities.visibility_timeout == 45.0
    assert broker.capabilities.max_batch == 10
    assert broker.sqs_name("orders.dlq") == "dev-orders-dlq"
    assert broker.sqs_name("orders.fifo") == "dev-orders.fifo"
    assert "eu-west-1" in repr(broker)
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        SQSBroker.from_url("sqs://us-east-1/?visiblity_timeout=3")
    with pytest.raises(ConfigurationError, match="wait_time"):
        SQSBroker.from_url("sqs://us-east-1/?wait_time=30")
    with pytest.raises(ConfigurationError, match="not a valid value"):
        SQSBroker.from_url("sqs://us-east-1/?create_queues=maybe")
    with pytest.raises(ConfigurationError) as info:
        SQSBroker.from_url("sqs://AKIDEXAMPLE:hunter2secret@us-east-1/")
    assert "hunter2secret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="letters, digits"):
        broker.sqs_name("bad name")


async def test_missing_queue_without_create_is_a_clear_error(new_broker: MakeBroker) -> None:
    broker = await new_broker(create_queues=False)
    queue = unique("absent")
    with pytest.raises(QueueNotFound, match="create_queues"):
        await broker.declare(queue)
    with pytest.raises(QueueNotFound):
        await broker.publish(queue, b"x")
    creator = await new_broker()
    await creator.declare(queue)
    with pytest.raises(ConfigurationError, match="900"):
        await creator.publish(queue, b"x", delay=901)
    await creator.publish(queue, b"x", delay=1)  # a delay SQS takes
    assert await creator.depth(queue) == 1  # delayed messages count as queued


async def test_unreachable_server_fails_on_connect() -> None:
    broker: Broker = SQSBroker.from_url("sqs://us-east-1/?endpoint_url=http://127.0.0.1:9&max_connections=1")
    with pytest.raises(BrokerConnectionError, match="cannot reach SQS"):
        await broker.connect()
