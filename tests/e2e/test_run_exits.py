"""How a ``taskstream run`` process ends, as the README's "Workers die, servers restart" and "Graceful stop" say.

* A worker whose broker stays gone (RabbitMQ's ``reconnect_timeout``) or whose queue is deleted exits 1, saying
  why, so its supervisor starts it again; it does not idle on with nothing consumed.
* SIGTERM: stop pulling, finish in-flight work, return the rest to the queue, exit 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aio_pika
import pytest

from tests.e2e.conftest import URLS, Served, connected, unique
from tests.support.servers import PrivateRabbitMQ
from tests.support.waiting import wait_for


async def started(worker: Served) -> None:
    await wait_for(
        lambda: "app started" in worker.output() or not worker.alive(), timeout=60, what="the worker to start"
    )
    assert worker.alive(), worker.output()[-3000:]


async def exit_code(worker: Served, timeout: float) -> int:
    """The worker's exit code once it ended by itself (fails the test if it is still running after ``timeout``)."""
    await wait_for(lambda: not worker.alive(), timeout=timeout, what="the worker to exit by itself")
    assert worker.process is not None
    return worker.process.wait()


@pytest.mark.rabbitmq
async def test_run_exits_1_naming_the_server_when_rabbitmq_stays_gone(
    rabbitmq_node: PrivateRabbitMQ, serve: Callable[..., Served]
) -> None:
    worker = serve(f"{rabbitmq_node.url}?reconnect_timeout=3", unique("gone")).start()
    await started(worker)
    await asyncio.to_thread(rabbitmq_node.stop)  # and it stays gone
    assert await exit_code(worker, timeout=60) == 1, worker.output()[-3000:]
    output = worker.output()
    assert f"RabbitMQ at amqp://guest:***@127.0.0.1:{rabbitmq_node.port}/" in output, output[-3000:]
    assert "unreachable for 3.0 s; giving up" in output, output[-3000:]


@pytest.mark.rabbitmq
async def test_run_exits_1_when_its_queue_is_deleted(
    serve: Callable[..., Served], queues: Callable[[str, str], str]
) -> None:
    url = URLS["rabbitmq"]
    queue = queues(url, "deleted")
    worker = serve(url, queue).start()
    await started(worker)
    connection = await aio_pika.connect(url)  # a plain client deletes the queue under the running worker
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    assert await exit_code(worker, timeout=30) == 1, worker.output()[-3000:]
    output = worker.output()
    assert f"stopping the app: consumer on {queue!r}" in output and "was the queue deleted?" in output, output


COUNT = 40  # published before the worker starts: it holds them all (prefetch 64) and runs 4 at a time
SLOW = 1.0  # seconds per handler call, well within the 5 s shutdown grace the e2e processes get


@pytest.mark.rabbitmq
async def test_sigterm_on_rabbitmq_finishes_in_flight_work_and_returns_the_rest(
    serve: Callable[..., Served], queues: Callable[[str, str], str]
) -> None:
    url = URLS["rabbitmq"]
    queue = queues(url, "sigterm")
    async with connected(url) as broker:
        dead_letters = broker.dead_letter_name(queue)
        await broker.declare(dead_letters)
        await broker.declare(queue, dead_letter=dead_letters)
        for n in range(COUNT):
            await broker.publish(queue, json.dumps({"n": n}).encode())

    worker = serve(url, queue, delay=SLOW).start()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()

        async def ready() -> int:
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count is not None
            return declared.declaration_result.message_count

        async def all_delivered() -> bool:
            return await ready() == 0

        # every message delivered to the worker: a few run, the rest wait in its buffer
        await wait_for(all_delivered, timeout=60, what=f"the worker to hold all {COUNT} messages")
        assert await worker.terminate() == 0, worker.output()[-3000:]
        runs = worker.seen()
        finished = set(runs)
        assert len(runs) == len(finished), f"a clean stop ran messages twice: {sorted(runs)}"
        unfinished = set(range(COUNT)) - finished
        assert len(unfinished) > 4, f"the worker finished {len(finished)} before the stop: nothing was tested"
        assert "stopping: finishing in-flight work" in worker.output()

        # Back in the queue: every unfinished message, once; none of the finished ones.
        assert await ready() == len(unfinished)
        returned: list[int] = []
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(fail=False)) is not None:
            returned.append(json.loads(message.body)["n"])
            await message.ack()
    assert sorted(returned) == sorted(unfinished)
