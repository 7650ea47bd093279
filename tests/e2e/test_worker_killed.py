"""A ``taskstream run`` worker SIGKILLed mid-run: a new one processes every message, the dead-letter queue holds
only the messages that deserve it. On RabbitMQ, SQS (moto) and Azure Storage Queues (Azurite)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from taskstream import App, gather
from taskstream.messages import Envelope
from taskstream.producer import Producer
from tests.e2e.conftest import URLS, Served, connected
from tests.support.waiting import wait_for

BACKENDS = [pytest.param(name, marks=getattr(pytest.mark, name), id=name) for name in ("rabbitmq", "sqs", "azure")]
COUNT = 200
#: bad bodies, fed between the good ones: not JSON, and JSON that does not fit the handler's annotation
POISON = {"bad-json-0": b"not json", "bad-type-1": b'{"n": "one"}', "bad-json-2": b"\x00\xff"}


async def drain_ids(url: str, queue: str, expected: int, idle: float = 3.0) -> list[str]:
    """Message ids of everything on ``queue`` (acked), once ``expected`` arrived and ``idle`` s passed quietly."""
    ids: list[str] = []
    async with connected(url) as broker, broker.consume(queue, prefetch=16) as subscription:
        async with asyncio.timeout(60):
            while True:
                try:
                    async with asyncio.timeout(idle if len(ids) >= expected else 60):
                        delivery = await subscription.__anext__()
                except TimeoutError:
                    return ids
                assert "x-death-reason" in delivery.headers, delivery.headers
                ids.append(delivery.message_id)
                await delivery.ack()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_worker_killed_mid_run_then_replaced_loses_nothing(
    backend: str, serve: Callable[..., Served], queues: Callable[[str, str], str]
) -> None:
    url = URLS[backend]
    queue = queues(url, "killed")
    async with connected(url) as broker:
        dead_letters = broker.dead_letter_name(queue)
        await broker.declare(dead_letters)
        await broker.declare(queue, dead_letter=dead_letters)
        producer = Producer(broker)
        half = COUNT // 2
        await producer.send_many(queue, [Envelope(body={"n": i}) for i in range(half)])
        for message_id, body in POISON.items():
            await broker.publish(queue, body, message_id=message_id)
        await producer.send_many(queue, [Envelope(body={"n": i}) for i in range(half, COUNT)])

    worker = serve(url, queue).start()
    await wait_for(lambda: len(worker.seen()) >= COUNT // 3, timeout=90, what="the first worker to get going")
    worker.kill()
    done_before_kill = set(worker.seen())
    assert len(done_before_kill) < COUNT, "the worker finished before it was killed: nothing was tested"

    worker.start()  # a new process, same app, same queue
    await wait_for(
        lambda: set(worker.seen()) >= set(range(COUNT)), timeout=120, what=f"all {COUNT} messages after the kill"
    )
    seen = worker.seen()
    assert set(seen) == set(range(COUNT))  # nothing lost, nothing invented (duplicates are allowed)
    assert sorted(set(await drain_ids(url, dead_letters, expected=len(POISON)))) == sorted(POISON)
    assert await worker.terminate() == 0, worker.output()[-3000:]
    async with connected(url) as broker:
        # Nothing left, in flight included: depth leaves out SQS's received-and-hidden messages (a message a
        # worker took and never settled would pass a depth check for its whole visibility timeout).
        stats = await broker.queue_stats(queue)
        assert (stats.depth, stats.in_flight or 0) == (0, 0), stats


@pytest.mark.rabbitmq
async def test_task_worker_killed_mid_run_every_future_still_resolves(
    serve: Callable[..., Served], queues: Callable[[str, str], str], tmp_path: Path
) -> None:
    url = URLS["rabbitmq"]
    task_queue = queues(url, "tasks")
    worker = serve(url, queues(url, "unused"), verb="worker", task_queue=task_queue, delay=0.01).start()
    client = App(url, workers=False, result_store=f"sqlite:///{tmp_path / 'results.sqlite3'}")  # the worker's
    async with client:
        futures = client.remote("square", queue=task_queue).map(range(COUNT))
        await wait_for(lambda: len(worker.seen()) >= COUNT // 3, timeout=90, what="the first worker to get going")
        worker.kill()
        assert len(set(worker.seen())) < COUNT, "the worker finished before it was killed: nothing was tested"
        worker.start()
        async with asyncio.timeout(120):
            results = await gather(futures)
        infos = [client.get_task(f.task_id) for f in futures]
    assert results == [n * n for n in range(COUNT)]
    assert {info.status for info in infos} == {"success"}
    assert max(info.attempts for info in infos) >= 2  # the killed worker's calls ran again on the new one
    assert await worker.terminate() == 0, worker.output()[-3000:]
