"""Tasks and a distributed pipeline over RabbitMQ while the connection is cut again and again.

A TcpProxy stands between one side (the task client, the task worker, or the pipeline's stages) and RabbitMQ;
while traffic flows it aborts every connection through it 40 times, 50-100 ms apart. Afterwards: no submit
failed, every future resolved with its own result, the pipeline gave the fused results, and no consumer
stopped by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from taskstream.app import App
from taskstream.brokers.rabbitmq import RabbitMQBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.messages import Envelope
from taskstream.producer import Producer
from taskstream.stream_ops import Count, EventClock, ListSink, Mean, Pipeline, SimulatedSensor, TumblingWindow
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.cuts import cut_rapidly, still_running
from tests.support.names import unique
from tests.support.proxy import TcpProxy
from tests.support.queues import delete_queues
from tests.support.waiting import wait_for
from tests.tasks.conftest import quick_settings

pytestmark = pytest.mark.rabbitmq

CUTS = 40
TASKS = 300
PORT = urlsplit(URL).port or 5672


async def triple(i: int) -> int:
    return i * 3


def through(proxy: TcpProxy) -> str:
    return URL.replace(f":{PORT}", f":{proxy.port}", 1)


async def cut_repeatedly(proxy: TcpProxy, *watch: App) -> None:
    """``CUTS`` cuts 50-100 ms apart; fails at once when an App's consumer stopped by itself meanwhile."""

    def no_consumer_stopped() -> None:
        for app in watch:
            failed = [c.failure for c in app.all_consumers() if c.failure is not None]
            assert not failed, f"a consumer stopped by itself: {failed}"

    await cut_rapidly(proxy, CUTS, no_consumer_stopped)


@dataclass
class Apps:
    proxy: TcpProxy
    worker: App
    client: App
    task: Any


@contextlib.asynccontextmanager
async def task_apps(tmp_path: Path, cut: str) -> AsyncIterator[Apps]:
    """A worker App and a client App sharing one store; the side named ``cut`` reaches RabbitMQ via a proxy."""
    queue = unique("rapid-cuts")
    proxy = TcpProxy(PORT)
    await proxy.up()
    store = f"sqlite:///{tmp_path / 'results.sqlite3'}"

    def broker(side: str) -> RabbitMQBroker:
        if side == cut:
            return RabbitMQBroker.from_url(through(proxy), reconnect_interval=0.1, reconnect_timeout=120)
        return RabbitMQBroker.from_url(URL)

    worker = App(broker=broker("worker"), settings=quick_settings(), result_store=store, workers=True)
    client = App(broker=broker("client"), settings=quick_settings(), result_store=store, workers=False)
    worker.task(queue=queue)(triple)
    task = client.task(queue=queue)(triple)
    try:
        async with worker, client:
            yield Apps(proxy, worker, client, task)
    finally:
        await proxy.stop()
        await delete_queues(URL, queue)


@pytest.mark.parametrize("cut", ["client", "worker"])
async def test_every_task_resolves_through_rapid_cuts(tmp_path: Path, cut: str) -> None:
    async with task_apps(tmp_path, cut) as apps:
        futures: list[Any] = []

        async def submit() -> None:
            for i in range(TASKS):
                futures.append(apps.task.submit(i))
                if i % 10 == 9:
                    await asyncio.sleep(0.08)

        submitting = asyncio.create_task(submit())
        await cut_repeatedly(apps.proxy, apps.worker, apps.client)
        await submitting
        assert apps.proxy.cuts == CUTS

        def settled() -> bool:
            for app in (apps.worker, apps.client):
                assert app.failure is None, app.failure
            return all(f.done() for f in futures)

        await wait_for(settled, timeout=90, what=f"all {TASKS} futures settled")
        errors = [(i, f.exception()) for i, f in enumerate(futures) if f.exception() is not None]
        assert errors == [], f"{len(errors)} futures failed; first: {errors[:3]}"
        assert [f.result() for f in futures] == [i * 3 for i in range(TASKS)]
        for app in (apps.worker, apps.client):
            assert [c.failure for c in app.all_consumers() if c.failure is not None] == []


def sensor_pipeline(name: str, sink: ListSink, per_second: float | None = None) -> Pipeline:
    p = Pipeline(name)
    sensor = SimulatedSensor(6, rate=100, count=4000, start=0.0, late=0.02, out_of_order=0.1, seed=7)
    readings = p.source("sensor", sensor)
    if per_second:  # the distributed run lasts through the cuts
        readings = readings.rate_limit(per_second, burst=50)
    keyed = readings.filter(lambda r: r["value"] is not None).key_by(lambda r: r["sensor"])
    windows = keyed.window(TumblingWindow(1.0), EventClock("t", allowed_lateness=0.5), name="win", stage="windows")
    windows.aggregate(n=Count(), mean=Mean("value")).stage("store").sink(sink)
    p.stage("windows").parallelism(2)
    return p


def canon(items: list[Any]) -> list[str]:
    return sorted(json.dumps(x, sort_keys=True) for x in items)


async def test_distributed_pipeline_gives_the_fused_results_through_rapid_cuts() -> None:
    fused = ListSink()
    await sensor_pipeline(unique("cuts-fused"), fused).run()
    assert fused.items
    sink = ListSink()
    pipeline = sensor_pipeline(unique("cuts-dist"), sink, per_second=1000)
    plan = pipeline.plan()
    queues = [q for stage in plan.stages.values() for q in stage.queues] + [plan.dead_letter_queue]
    proxy = TcpProxy(PORT)
    await proxy.up()
    broker = RabbitMQBroker.from_url(through(proxy), reconnect_interval=0.1, reconnect_timeout=120)
    try:
        running = asyncio.create_task(pipeline.run_distributed(broker))
        for cut in range(CUTS):
            await asyncio.sleep(0.05 + 0.05 * (cut % 2))
            proxy.cut()
            if running.done():
                break  # finished (or failed: awaited below) before all the cuts
        results = await asyncio.wait_for(running, 120)
        assert set(results) >= {"sensor", "windows", "store"}
        assert canon(sink.items) == canon(fused.items)
    finally:
        await proxy.stop()
        await delete_queues(URL, *queues)


async def test_declarations_wait_for_the_connection_through_rapid_cuts() -> None:
    """What the pipeline test met first: a stage declaring a queue (its dead-letter queue, mid-run) as a cut
    came failed with ``BrokerConnectionError`` and took the whole run down, while publishes waited for the
    reconnect. A declaration is the same kind of call: it waits for the connection (up to publish_timeout)."""
    proxy = TcpProxy(PORT)
    await proxy.up()
    broker = RabbitMQBroker.from_url(through(proxy), reconnect_interval=0.1, reconnect_timeout=120)
    await broker.connect()
    declared: list[str] = []
    stop = asyncio.Event()

    async def declare() -> None:
        while not stop.is_set():
            queue = unique("rapid-cuts-declare")
            declared.append(queue)
            await broker.declare(queue, dead_letter=broker.dead_letter_name(queue))
            await broker.depth(queue)

    declaring = asyncio.create_task(declare())
    try:
        await cut_rapidly(proxy, CUTS, still_running(declaring, "a declaration"))
        stop.set()
        await asyncio.wait_for(declaring, 60)
        assert len(declared) > CUTS
    finally:
        stop.set()
        if not declaring.done():
            declaring.cancel()
        with contextlib.suppress(BaseException):
            await declaring
        await broker.close()
        await proxy.stop()
        await delete_queues(URL, *declared)


async def test_subscriptions_start_through_rapid_cuts() -> None:
    """What stopped the task client's reply listener: a subscription opening its channel just as the connection
    was cut raised "Connection was not opened" instead of waiting for the reconnect like any other loss."""
    proxy = TcpProxy(PORT)
    await proxy.up()
    broker = RabbitMQBroker.from_url(through(proxy), reconnect_interval=0.1, reconnect_timeout=120)
    await broker.connect()
    queues: list[str] = []
    stop = asyncio.Event()

    async def subscribe() -> None:
        while not stop.is_set():
            queue = unique("rapid-cuts-sub")
            queues.append(queue)
            await broker.declare(queue)
            await broker.publish(queue, b"hello")
            subscription = broker.consume(queue, prefetch=1)
            try:
                delivery = await asyncio.wait_for(subscription.__anext__(), 60)
                await delivery.ack()
            finally:
                await subscription.close()

    async def four_at_a_time() -> None:
        await asyncio.gather(*(subscribe() for _ in range(4)))

    subscribing = asyncio.create_task(four_at_a_time())
    try:
        await cut_rapidly(proxy, CUTS, still_running(subscribing, "a subscription"))
        stop.set()
        await asyncio.wait_for(subscribing, 90)
        assert len(queues) > CUTS / 2
    finally:
        stop.set()
        if not subscribing.done():
            subscribing.cancel()
        with contextlib.suppress(BaseException):
            await subscribing
        await broker.close()
        await proxy.stop()
        await delete_queues(URL, *queues)


async def test_consumers_resume_through_rapid_cuts() -> None:
    """What stopped task workers and pipeline stages: a resume that met a consume cut short on the reopened
    channel (aiormq keeps its consumer tag) failed for good with ``DuplicateConsumerTag``."""
    proxy = TcpProxy(PORT)
    await proxy.up()
    broker = RabbitMQBroker.from_url(through(proxy), reconnect_interval=0.1, reconnect_timeout=120)
    direct = RabbitMQBroker.from_url(URL)
    await broker.connect()
    await direct.connect()
    queues = [unique("rapid-cuts-resume") for _ in range(12)]
    seen: dict[str, set[int]] = {queue: set() for queue in queues}
    consumers: list[Consumer] = []
    for queue in queues:

        async def handle(message: Message, queue: str = queue) -> None:
            seen[queue].add(message.envelope.body)

        consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=10, concurrency=5, max_attempts=1000))
        await consumer.start()
        consumers.append(consumer)
    producer = Producer(direct)
    sent = 0
    stop = asyncio.Event()

    async def produce() -> None:
        nonlocal sent
        while not stop.is_set():
            await asyncio.gather(*(producer.send(queue, Envelope(body=sent)) for queue in queues))
            sent += 1
            await asyncio.sleep(0.005)

    publishing = asyncio.create_task(produce())
    try:

        def none_stopped() -> None:
            failed = [c.failure for c in consumers if c.failure is not None]
            assert not failed, f"a consumer stopped by itself: {failed}"

        await cut_rapidly(proxy, CUTS, none_stopped)
        stop.set()
        await publishing

        def all_seen() -> bool:
            none_stopped()
            return all(len(s) == sent for s in seen.values())

        await wait_for(all_seen, timeout=90, what=f"all {sent} messages on each of {len(queues)} queues")
    finally:
        stop.set()
        if not publishing.done():
            publishing.cancel()
        with contextlib.suppress(BaseException):
            await publishing
        for consumer in consumers:
            await consumer.stop(grace=5)
        await broker.close()
        await direct.close()
        await proxy.stop()
        await delete_queues(URL, *queues)
