"""The broker contract: one suite, run against every backend in ``backends/``.

Tests skip only where the backend's ``Capabilities`` say a feature is absent, and the skip says so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid

import pytest

from taskstream.brokers.base import Broker, OutgoingMessage, QueueStats
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import MessageTooLarge, QueueNotFound
from taskstream.messages import Envelope
from taskstream.payloads import ClaimCheck
from taskstream.producer import Producer
from tests.brokers.contract.conftest import Ctx, receive, receive_none
from tests.support.waiting import wait_for


def env_bytes(body: object, **fields: object) -> bytes:
    return Envelope.model_validate({"body": body, **fields}).to_bytes()


async def test_publish_consume_roundtrip_keeps_body_headers_and_id(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish(queue, b'{"hello": "world"}', headers={"h1": "v1"}, message_id="m-1")
    async with broker.consume(queue, prefetch=4) as sub:
        [d] = await receive(sub, 1)
        assert d.body == b'{"hello": "world"}'
        assert d.headers.get("h1") == "v1"
        assert d.message_id == "m-1"
        assert d.attempt == 1
        assert d.queue == queue
        await d.ack()


async def test_ack_removes_message_for_good(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish(queue, b"1")
    async with broker.consume(queue, prefetch=1) as sub:
        [d] = await receive(sub, 1)
        await d.ack()
    async with broker.consume(queue, prefetch=1) as sub:
        await receive_none(sub, 1.5)
    assert await broker.depth(queue) == 0


async def test_nack_requeue_redelivers_with_attempt_plus_one(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish(queue, b"again", message_id="m-again")
    async with broker.consume(queue, prefetch=1) as sub:
        [first] = await receive(sub, 1)
        assert first.attempt == 1
        await first.nack(requeue=True)
        [second] = await receive(sub, 1)
        assert second.body == b"again"
        assert second.message_id == "m-again"
        assert second.attempt == 2
        await second.ack()


async def test_nack_with_delay_hides_message_until_the_delay_passes(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish(queue, b"later")
    async with broker.consume(queue, prefetch=1) as sub:
        [first] = await receive(sub, 1)
        await first.nack(requeue=True, delay=3)
        await receive_none(sub, 1.0)
        [second] = await receive(sub, 1)
        assert second.body == b"later"
        assert second.attempt == 2
        await second.ack()


async def test_message_of_a_consumer_that_dies_without_ack_is_redelivered(ctx: Ctx) -> None:
    survivor = await ctx.broker(visibility_timeout=2)
    doomed = await ctx.broker(visibility_timeout=2)
    queue = await ctx.queue(survivor)
    await survivor.publish(queue, b"precious", message_id="m-precious")
    sub = doomed.consume(queue, prefetch=1)
    [held] = await receive(sub, 1)
    assert held.attempt == 1
    await doomed.close()  # dies holding the message, never acks
    async with survivor.consume(queue, prefetch=1) as sub2:
        [again] = await receive(sub2, 1)
        assert again.body == b"precious"
        assert again.message_id == "m-precious"
        assert again.attempt == 2
        await again.ack()


async def test_unacked_message_returns_after_visibility_timeout(ctx: Ctx) -> None:
    broker = await ctx.broker(visibility_timeout=2)
    if broker.capabilities.visibility_timeout is None:
        pytest.skip(f"{broker.capabilities.name}: messages are held until ack or disconnect (no visibility timeout)")
    queue = await ctx.queue(broker)
    await broker.publish(queue, b"v")
    async with broker.consume(queue, prefetch=10) as sub:
        [first] = await receive(sub, 1)
        [second] = await receive(sub, 1)  # the same message, back after the timeout, never acked
        assert second.body == b"v"
        assert second.attempt == 2
        await second.ack()
        del first


async def test_prefetch_bounds_unsettled_deliveries(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish_batch(queue, [OutgoingMessage(str(i).encode()) for i in range(5)])
    async with broker.consume(queue, prefetch=2) as sub:
        got = await receive(sub, 2)
        await receive_none(sub, 1.0)
        await got[0].ack()
        more = await receive(sub, 1)
        for d in [got[1], *more]:
            await d.ack()
        rest = await receive(sub, 2)
        for d in rest:
            await d.ack()
    assert sorted(int(d.body) for d in [*got, *more, *rest]) == [0, 1, 2, 3, 4]


async def test_publish_batch_and_depth_and_purge(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish_batch(queue, [OutgoingMessage(f"m{i}".encode(), {"i": str(i)}) for i in range(25)])
    depth = 0
    for _ in range(60):  # depth is approximate on some brokers: poll until it settles
        depth = await broker.depth(queue)
        if depth == 25:
            break
        await asyncio.sleep(0.5)
    assert depth == 25
    await broker.purge(queue)
    for _ in range(60):
        depth = await broker.depth(queue)
        if depth == 0:
            break
        await asyncio.sleep(0.5)
    assert depth == 0


async def settled_stats(broker: Broker, queue: str, expected: QueueStats) -> QueueStats:
    """``queue_stats`` once it equals ``expected`` (approximate counts settle), or the last one after 30 s."""
    stats = await broker.queue_stats(queue)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while stats != expected:
                await asyncio.sleep(0.2)
                stats = await broker.queue_stats(queue)
    return stats


async def test_queue_stats_count_ready_in_flight_and_consumers_as_the_capabilities_say(ctx: Ctx) -> None:
    broker = await ctx.broker()
    caps = broker.capabilities
    queue = await ctx.queue(broker)
    await broker.publish_batch(queue, [OutgoingMessage(str(i).encode()) for i in range(3)])
    holding = QueueStats(
        depth=3 if caps.depth_counts_in_flight else 2,
        in_flight=1 if caps.reports_in_flight else None,
        consumers=1 if caps.reports_consumers else None,
    )
    async with broker.consume(queue, prefetch=1) as sub:
        [held] = await receive(sub, 1)
        assert await settled_stats(broker, queue, holding) == holding
        await held.ack()
    after = QueueStats(2, 0 if caps.reports_in_flight else None, 0 if caps.reports_consumers else None)
    assert await settled_stats(broker, queue, after) == after
    assert await broker.depth(queue) == 2
    with pytest.raises(QueueNotFound):
        await broker.queue_stats(ctx.spec.queue_name(f"ct-missing-{uuid.uuid4().hex[:10]}"))


async def test_message_over_size_limit_raises_a_clear_error(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    limit = broker.capabilities.max_message_bytes
    if limit > 64 * 1024 * 1024:
        pytest.skip(f"{broker.capabilities.name}: size limit {limit} too large to test cheaply")
    with pytest.raises(MessageTooLarge) as info:
        await Producer(broker, claim_check=ClaimCheck.disabled()).send(queue, Envelope(body="x" * (limit + 10)))
    assert str(limit) in str(info.value)
    with pytest.raises(MessageTooLarge):
        await broker.publish(queue, b"x" * (limit + 1))


async def test_key_travels_with_the_message(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    await broker.publish(queue, b"k", key="sensor-7")
    async with broker.consume(queue, prefetch=1) as sub:
        [d] = await receive(sub, 1)
        assert d.key == "sensor-7"
        await d.ack()


async def test_topic_fanout_reaches_every_matching_queue(ctx: Ctx) -> None:
    broker = await ctx.broker()
    if not broker.capabilities.fanout:
        pytest.skip(f"{broker.capabilities.name}: no topic pub/sub (Capabilities.fanout is False)")
    all_sensors = ctx.spec.queue_name("fan-all")
    only_a = ctx.spec.queue_name("fan-a")
    stem = f"sensors{id(ctx)}"
    await broker.declare(all_sensors, topics=[f"{stem}.#"])
    await broker.declare(only_a, topics=[f"{stem}.a"])
    await broker.purge(all_sensors)
    await broker.purge(only_a)
    await broker.publish_topic(f"{stem}.a", b"A")
    await broker.publish_topic(f"{stem}.b", b"B")
    async with broker.consume(all_sensors, prefetch=10) as sub:
        got = await receive(sub, 2)
        assert sorted(d.body for d in got) == [b"A", b"B"]
        for d in got:
            await d.ack()
    async with broker.consume(only_a, prefetch=10) as sub:
        [d] = await receive(sub, 1)
        assert d.body == b"A"
        await d.ack()
        await receive_none(sub, 1.0)
    for q in (all_sensors, only_a):
        with contextlib.suppress(Exception):
            await broker.delete_queue(q)


# -- the consumer runtime on top of each backend ------------------------------------------------------


async def test_competing_consumers_share_the_work(ctx: Ctx) -> None:
    broker_a = await ctx.broker()
    broker_b = await ctx.broker()
    queue = await ctx.queue(broker_a)
    seen: dict[str, list[int]] = collections.defaultdict(list)

    def handler_for(name: str):  # type: ignore[no-untyped-def]
        async def handle(message: Message) -> None:
            seen[name].append(message.envelope.body)
            await asyncio.sleep(0.05)  # long enough that one consumer cannot take everything

        return handle

    config = ConsumerConfig(prefetch=2, concurrency=2)
    a = Consumer(broker_a, queue, handler_for("a"), config)
    b = Consumer(broker_b, queue, handler_for("b"), config)
    await a.start()
    await b.start()
    await Producer(broker_a).send_many(queue, [Envelope(body=i) for i in range(40)])
    await wait_for(lambda: len(set(seen["a"]) | set(seen["b"])) == 40, what="40 messages")
    await a.stop()
    await b.stop()
    assert set(seen["a"]) | set(seen["b"]) == set(range(40))
    assert seen["a"] and seen["b"], f"one consumer took everything: {dict(seen)}"


async def test_failing_handler_is_retried_then_dead_lettered_with_reason(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    attempts: list[int] = []

    async def handle(message: Message) -> None:
        attempts.append(message.delivery.attempt)
        raise ValueError("sensor offline")

    consumer = Consumer(broker, queue, handle, ConsumerConfig(max_attempts=3, retry_delay=0.1))
    await consumer.start()
    original = env_bytes({"reading": 1}, id="orig-1")
    await broker.publish(queue, original, message_id="orig-1")
    await wait_for(lambda: consumer.stats.dead_lettered == 1, what="dead-letter")
    await consumer.stop()
    assert attempts == [1, 2, 3]
    async with broker.consume(broker.dead_letter_name(queue), prefetch=1) as sub:
        [dead] = await receive(sub, 1)
        assert dead.body == original
        reason = str(dead.headers["x-death-reason"])
        assert "sensor offline" in reason and "ValueError" in reason
        assert dead.headers["x-original-queue"] == queue
        assert int(dead.headers["x-attempts"]) == 3
        await dead.ack()


async def test_malformed_message_is_dead_lettered_and_good_ones_keep_flowing(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    handled: list[object] = []

    async def handle(message: Message) -> None:
        handled.append(message.envelope.body)

    consumer = Consumer(broker, queue, handle, ConsumerConfig(max_attempts=3))
    await consumer.start()
    await broker.publish(queue, env_bytes(1))
    await broker.publish(queue, b"\x00\xffnot json at all")
    await broker.publish(queue, env_bytes(2))
    await wait_for(lambda: len(handled) == 2 and consumer.stats.dead_lettered == 1, what="2 handled + 1 dlq")
    await consumer.stop()
    assert sorted(handled) == [1, 2]  # type: ignore[type-var]
    async with broker.consume(broker.dead_letter_name(queue), prefetch=1) as sub:
        [dead] = await receive(sub, 1)
        assert dead.body == b"\x00\xffnot json at all"
        assert "malformed" in str(dead.headers["x-death-reason"])
        await dead.ack()


async def test_slow_handler_keeps_its_message_and_runs_once(ctx: Ctx) -> None:
    broker = await ctx.broker(visibility_timeout=2)
    other = await ctx.broker(visibility_timeout=2)
    queue = await ctx.queue(broker)
    runs: list[int] = []
    timeout = broker.capabilities.visibility_timeout or 2

    async def slow(message: Message) -> None:
        runs.append(message.delivery.attempt)
        await asyncio.sleep(timeout * 3)

    consumer = Consumer(broker, queue, slow, ConsumerConfig(prefetch=1, concurrency=1))
    rival = Consumer(other, queue, slow, ConsumerConfig(prefetch=1, concurrency=1))
    await broker.publish(queue, env_bytes("slow"))
    await consumer.start()
    await wait_for(lambda: len(runs) == 1, what="first run")
    await rival.start()  # a second consumer stands ready to steal the message if its visibility lapses
    await wait_for(lambda: consumer.stats.acked == 1, what="the slow handler to finish")
    await asyncio.sleep(timeout + 1)
    await consumer.stop()
    await rival.stop()
    assert runs == [1]


async def test_graceful_shutdown_loses_nothing_and_runs_nothing_twice(ctx: Ctx) -> None:
    broker = await ctx.broker()
    queue = await ctx.queue(broker)
    started: list[int] = []
    finished: list[int] = []

    async def handle(message: Message) -> None:
        started.append(message.envelope.body)
        await asyncio.sleep(0.5)
        finished.append(message.envelope.body)

    first = Consumer(broker, queue, handle, ConsumerConfig(prefetch=8, concurrency=4, shutdown_grace=30))
    await first.start()
    await Producer(broker).send_many(queue, [Envelope(body=i) for i in range(20)])
    await wait_for(lambda: len(started) >= 4, what="work in flight")
    await first.stop()  # stops pulling; the 4 running finish; prefetched ones go back
    assert sorted(started) == sorted(finished), "stop() abandoned running work"
    done_first = set(finished)

    second_broker = await ctx.broker()
    second = Consumer(second_broker, queue, handle, ConsumerConfig(prefetch=8, concurrency=8))
    await second.start()
    await wait_for(lambda: set(finished) == set(range(20)), what="the rest to be processed")
    await second.stop()
    counts = collections.Counter(finished)
    assert set(counts) == set(range(20)), "messages were lost"
    twice = [body for body, count in counts.items() if count > 1]
    assert not twice, f"ran twice: {twice}"
    assert done_first, "the first consumer did nothing"


async def test_an_ordered_broker_hands_one_consumer_a_keys_messages_in_publish_order(ctx: Ctx) -> None:
    broker = await ctx.broker()
    if not broker.capabilities.ordered:
        pytest.skip(f"{broker.capabilities.name}: Capabilities.ordered is False (no order is promised)")
    queue = await ctx.queue(broker, fifo=True)  # SQS keeps order on FIFO queues, per key (message group)
    await broker.publish_batch(queue, [OutgoingMessage(b"%d" % n, {}, message_id=f"o-{n}", key="k") for n in range(20)])
    seen: list[int] = []
    async with broker.consume(queue, prefetch=1) as sub:
        for _ in range(20):
            [delivery] = await receive(sub, 1)
            seen.append(int(delivery.body))
            await delivery.ack()
    assert seen == list(range(20))
