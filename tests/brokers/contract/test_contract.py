"""The broker contract: one suite, run against every backend in ``backends/``.

Tests skip only where the backend's ``Capabilities`` say a feature is absent, and the skip says so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import pytest

from taskstream.brokers.base import Broker, Delivery, OutgoingMessage, QueueStats
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import MessageTooLarge, QueueNotFound
from taskstream.messages import Envelope
from taskstream.payloads import ClaimCheck
from taskstream.producer import Producer
from tests.brokers.contract.conftest import Ctx, receive, receive_none
from tests.support.names import unique
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[3]
#: Visibility timeout (s) of the brokers of tests that wait for a message to come back (where brokers have one).
SHORT_VISIBILITY = 2.0


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
    # An ack that does not remove the message leaves it held: it comes back when the closing subscription
    # returns it (brokers that hold until ack or disconnect) or when its visibility lapses, and until then the
    # broker still counts it (in flight, or in the depth). A short visibility timeout lets the test wait past it.
    broker = await ctx.broker(visibility_timeout=SHORT_VISIBILITY)
    caps = broker.capabilities
    queue = await ctx.queue(broker)
    await broker.publish(queue, b"1")
    async with broker.consume(queue, prefetch=1) as sub:
        [d] = await receive(sub, 1)
        await d.ack()
    async with broker.consume(queue, prefetch=1) as sub:
        await receive_none(sub, (caps.visibility_timeout or 0) + 1.5)  # past the visibility, counted from the ack
    gone = QueueStats(0, 0 if caps.reports_in_flight else None, 0 if caps.reports_consumers else None)
    assert await settled_stats(broker, queue, gone) == gone
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
    delay = min(3.0, broker.capabilities.max_delay)
    async with broker.consume(queue, prefetch=1) as sub:
        [first] = await receive(sub, 1)
        nacked = time.monotonic()  # the message is due no earlier than ``delay`` after this
        await first.nack(requeue=True, delay=delay)
        await receive_none(sub, nacked + 0.8 * delay - time.monotonic())  # absent until shortly before it is due
        [second] = await receive(sub, 1)
        assert second.body == b"later"
        assert second.attempt == 2
        await second.ack()


async def hold_in_a_process_and_kill_it(url: str, queue: str) -> None:
    """A consumer process (``holder.py``) takes the message and holds it, alive; then it is SIGKILLed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.brokers.contract.holder",
        url,
        queue,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        try:
            async with asyncio.timeout(30):
                line = await process.stdout.readline()
        except TimeoutError:
            pytest.fail("the holder process received nothing within 30 s")
        if not line:
            await process.wait()
            error = (await process.stderr.read()).decode(errors="replace")[-2000:]
            pytest.fail(f"the holder process ended (exit {process.returncode}) before holding the message:\n{error}")
        held = json.loads(line)
        assert held == {"message_id": "m-precious", "attempt": 1}
    finally:
        if process.returncode is None:
            process.kill()  # SIGKILL: no close, no unsubscribe, no goodbye of any kind
        await process.wait()
    assert process.returncode == -signal.SIGKILL


async def hold_and_vanish_in_process(ctx: Ctx, queue: str) -> None:
    """The in-process variant: a consumer task takes the message and is cancelled; its subscription is dropped
    without ``close`` and its broker is left open, so nothing returns the message but the broker itself."""
    doomed = await ctx.broker(visibility_timeout=SHORT_VISIBILITY)
    held: list[Delivery] = []

    async def hold() -> None:
        held.append(await doomed.consume(queue, prefetch=1).__anext__())
        await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await wait_for(lambda: held or task.done(), what="the doomed consumer to hold the message", timeout=30)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert [(d.message_id, d.attempt) for d in held] == [("m-precious", 1)]


async def test_message_of_a_consumer_that_dies_without_ack_is_redelivered(ctx: Ctx) -> None:
    survivor = await ctx.broker()
    queue = await ctx.queue(survivor)
    await survivor.publish(queue, b"precious", message_id="m-precious")
    if ctx.spec.url is None:  # in-process (memory): no other process can reach the broker
        assert survivor.capabilities.in_process
        await hold_and_vanish_in_process(ctx, queue)
    else:
        await hold_in_a_process_and_kill_it(ctx.spec.url(visibility_timeout=SHORT_VISIBILITY), queue)
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

    async def depth_is(expected: int) -> bool:
        return await broker.depth(queue) == expected

    # depth is approximate on some brokers: poll until it settles
    await wait_for(lambda: depth_is(25), what="depth 25 after publishing 25", timeout=30, interval=0.2)
    await broker.purge(queue)
    await wait_for(lambda: depth_is(0), what="depth 0 after the purge", timeout=30, interval=0.2)


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
        await broker.queue_stats(ctx.spec.queue_name(unique("ct-missing")))


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
    stem = unique("sensors")  # topics unique to this run too: another run's publishes never reach these queues
    all_sensors = await ctx.queue(broker, stem="fan-all", topics=[f"{stem}.#"])
    only_a = await ctx.queue(broker, stem="fan-a", topics=[f"{stem}.a"])
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
