"""Task calls due together travel in bundles (``taskstream.bundles``, ``taskstream.tasks.bundling``).

* On every broker: a burst of calls becomes fewer broker messages (seen in the queue's depth where the broker
  reports it exactly), every result comes back, and each call runs once.
* A call that fails and retries inside a bundle does not run the other calls of its bundle again.
* How the client sizes bundles from the run times it learns.
* A reply bundle with a broken part: that part is dead-lettered alone, the other replies settle their futures.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from taskstream.brokers.base import OutgoingMessage
from taskstream.bundles import MAX_PART_BYTES, fits, pack
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import QueueNotFound
from taskstream.intake import reply_dead_letter_queue
from taskstream.messages import Envelope, encode
from taskstream.payloads import ClaimCheck
from taskstream.tasks.bundling import BUNDLE_SHORT, BUNDLE_UNKNOWN, SHORT_RUN, Bundler
from tests.brokers.contract.backends import all_specs
from tests.support.waiting import wait_for
from tests.tasks.conftest import TaskEnv, task_env

RUNS: Counter[int] = Counter()


async def count_run(i: int) -> int:
    RUNS[i] += 1
    return i * 2


FAILED_ONCE: set[int] = set()


async def fail_once_on_seven(i: int) -> int:
    RUNS[i] += 1
    if i == 7 and i not in FAILED_ONCE:
        FAILED_ONCE.add(i)
        raise ConnectionError("the first attempt of call 7 fails")
    return i


@pytest.fixture(params=[pytest.param(s, id=s.name, marks=getattr(pytest.mark, s.name)) for s in all_specs()])
async def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskEnv]:
    """The task tests' environment on every broker (the other task tests run on memory and RabbitMQ)."""
    async with task_env(request.param, tmp_path) as env:
        yield env


async def test_a_burst_travels_in_bundles_and_every_call_runs_once(any_env: TaskEnv) -> None:
    env = any_env
    RUNS.clear()
    queue = env.queue("bundled")
    name = f"count_run_{uuid.uuid4().hex[:6]}"
    client = env.app(workers=False)
    task = client.task(queue=queue, name=name)(count_run)
    calls = 5 * BUNDLE_UNKNOWN
    async with client:
        futures = [task.submit(i) for i in range(calls)]
        if env.spec.name in ("memory", "rabbitmq"):  # brokers whose depth is exact: one message per bundle
            seen: list[object] = []

            async def bundles_queued() -> bool:
                try:
                    seen.append(await client.broker.depth(queue))
                except QueueNotFound:  # not declared yet
                    seen.append("not declared")
                return seen[-1] == calls // BUNDLE_UNKNOWN

            await wait_for(bundles_queued, what=f"{calls // BUNDLE_UNKNOWN} bundles on {queue}", timeout=30)
        worker = env.app(workers=True)
        worker.task(queue=queue, name=name)(count_run)
        async with worker:
            results = [await asyncio.wait_for(f, 120) for f in futures]
    assert results == [2 * i for i in range(calls)]
    assert Counter(range(calls)) == RUNS, "a call ran more than once, or not at all"


async def test_a_retry_inside_a_bundle_runs_no_other_call_again(any_env: TaskEnv) -> None:
    env = any_env
    RUNS.clear()
    FAILED_ONCE.clear()
    queue = env.queue("retry-in-bundle")
    name = f"fail_once_{uuid.uuid4().hex[:6]}"
    app = env.app(workers=True)
    task = app.task(queue=queue, name=name, retries=1, retry_delay=0.05)(fail_once_on_seven)
    async with app:
        futures = [task.submit(i) for i in range(BUNDLE_UNKNOWN * 2)]
        results = [await asyncio.wait_for(f, 120) for f in futures]
    assert results == list(range(BUNDLE_UNKNOWN * 2))
    assert RUNS[7] == 2
    assert {i: n for i, n in RUNS.items() if i != 7} == {i: 1 for i in range(BUNDLE_UNKNOWN * 2) if i != 7}


async def test_a_consumer_with_one_slot_and_one_prefetch_runs_a_whole_bundle(any_env: TaskEnv) -> None:
    """The pull loop holds the only slot while it waits for a delivery that a full prefetch window never
    brings: a bundle must run its messages in the slot it has, not wait for another."""
    env = any_env
    queue = env.queue("one-slot")
    broker = env.spec.make()
    seen: list[int] = []

    async def handle(message: Message) -> None:
        await asyncio.sleep(0.01)
        seen.append(message.envelope.body)

    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=1, concurrency=1), ClaimCheck.disabled())
    await broker.connect()
    try:
        await consumer.start()
        bundle = pack([OutgoingMessage(encode(Envelope(body=i))) for i in range(6)])
        await broker.publish(queue, bundle.body, headers=bundle.headers, message_id=bundle.message_id)
        await wait_for(lambda: len(seen) == 6, what="the 6 messages of the bundle handled", timeout=60)
        await wait_for(lambda: consumer.stats.acked == 6, what="all 6 settled", timeout=30)
    finally:
        await consumer.stop(grace=1.0)
        await broker.close()
    assert sorted(seen) == list(range(6))


def _message(size: int = 100) -> OutgoingMessage:
    return OutgoingMessage(b'{"ts":1,"kind":"task","id":"x","body":"' + b"a" * size + b'"}', {"ts_kind": "task"})


def test_bundle_sizes_follow_the_run_time_learned() -> None:
    bundler = Bundler()
    calls = [(_message(), "t", i) for i in range(100)]
    unknown = bundler.plan(calls, 1 << 20)
    assert [len(items) for _, items in unknown] == [BUNDLE_UNKNOWN] * 12 + [4]
    assert [item for _, items in unknown for item in items] == list(range(100)), "every call once, in order"

    bundler.learn("t", 10.0, 10.0 + SHORT_RUN / 10)
    short = bundler.plan(calls, 1 << 20)
    assert [len(items) for _, items in short] == [BUNDLE_SHORT, 100 - BUNDLE_SHORT]

    for _ in range(20):  # the average moves to a long run time: one call per message
        bundler.learn("t", 10.0, 10.0 + 1.0)
    long = bundler.plan(calls, 1 << 20)
    assert [len(items) for _, items in long] == [1] * 100
    assert [m.body for m, _ in long] == [m.body for m, _, _ in calls], "a lone call travels as it is"


def test_bundles_stay_under_their_byte_limit_and_big_calls_go_alone() -> None:
    bundler = Bundler()
    bundler.learn("t", 0.0, 0.0)
    big = _message(MAX_PART_BYTES + 1)
    assert not fits(big)
    calls = [(_message(1000), "t", i) for i in range(30)] + [(big, "t", 30)]
    wire = bundler.plan(calls, 10_000)
    assert all(len(m.body) <= 10_000 for m, items in wire if len(items) > 1)
    assert [m for m, items in wire if items == [30]] == [big]
    assert sorted(i for _, items in wire for i in items) == list(range(31))


def test_a_deep_or_delayed_message_is_never_bundled() -> None:
    deep = OutgoingMessage(b'{"ts":1,"body":' + b"[" * 127 + b"]" * 127 + b"}")
    assert not fits(deep)
    assert not fits(OutgoingMessage(b"{}", delay=1.0))
    assert fits(OutgoingMessage(b'{"ts":1}'))


async def test_a_broken_part_of_a_reply_bundle_is_dead_lettered_alone(any_env: TaskEnv) -> None:
    env = any_env
    queue = env.queue("reply-bundle")
    name = f"never_run_{uuid.uuid4().hex[:6]}"
    client = env.app(workers=False)
    task = client.task(queue=queue, name=name)(count_run)
    async with client:
        futures = [task.submit(i) for i in range(2)]
        task_ids = [f.task_id for f in futures]
        reply_queue = client.tasks.client.reply_queue
        await wait_for(lambda: client.tasks.client._ready is not None, what="the reply listener started")

        def reply(task_id: str, value: int) -> OutgoingMessage:
            doc = {
                "ts": 1,
                "kind": "result",
                "id": uuid.uuid4().hex,
                "correlation_id": task_id,
                "created_at": time.time(),
                "body": {"task_id": task_id, "status": "success", "result": value, "attempts": 1},
            }
            return OutgoingMessage(orjson.dumps(doc), {"ts_kind": "result", "correlation_id": task_id})

        broken = OutgoingMessage(b'{"ts":1,"kind":"result","id":7,"created_at":"never"}', {})
        bundle = pack([reply(task_ids[0], 100), broken, reply(task_ids[1], 101)])
        await client.broker.publish(reply_queue, bundle.body, headers=bundle.headers, message_id=bundle.message_id)
        results = [await asyncio.wait_for(f, 60) for f in futures]
        assert results == [100, 101]
        dlq = reply_dead_letter_queue(client.broker)
        dead = await _read_one(client.broker, dlq, bundle.message_id or "")
    assert "broken taskstream envelope" in str(dead.headers.get("x-death-reason")).lower()
    assert dead.headers.get("x-original-queue") == reply_queue
    assert dead.headers.get("x-bundle-index") == 1


async def _read_one(broker: object, dlq: str, bundle_id: str) -> object:
    subscription = broker.consume(dlq, prefetch=16)  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(30):
            async for delivery in subscription:
                if delivery.headers.get("x-bundle-id") == bundle_id:
                    await delivery.ack()
                    return delivery
                await delivery.nack(requeue=True)
    finally:
        await subscription.close()
    raise AssertionError("unreachable")


@pytest.mark.rabbitmq
async def test_calls_known_to_run_long_travel_alone_and_spread_over_workers(tmp_path: Path) -> None:
    """Once a task is known to run longer than SHORT_RUN, each call is its own message: two workers share a
    burst (a bundle would hand all of it to one). On RabbitMQ, which deals deliveries out among consumers (the
    memory broker hands them to whichever consumer asks first)."""
    (spec,) = [s for s in all_specs() if s.name == "rabbitmq"]
    async with task_env(spec, tmp_path) as env:
        await _spread_over_workers(env)


async def _spread_over_workers(env: TaskEnv) -> None:
    queue = env.queue("spread")
    name = f"slow_{uuid.uuid4().hex[:6]}"
    client = env.app(workers=False)
    task = client.task(queue=queue, name=name)(count_run)
    workers = []
    for label in ("a", "b"):
        worker = env.app(workers=True)

        async def slow(i: int, label: str = label) -> str:
            await asyncio.sleep(0.2)
            return label

        worker.task(queue=queue, name=name)(slow)
        workers.append(worker)
    async with client, workers[0], workers[1]:
        await asyncio.wait_for(task.submit(0), 60)  # the client learns the run time: about 0.2 s
        assert client.tasks.client.bundler.size_for(name) == 1
        futures = [task.submit(i) for i in range(BUNDLE_UNKNOWN)]
        labels = [await asyncio.wait_for(f, 60) for f in futures]
    assert set(labels) == {"a", "b"}, labels
