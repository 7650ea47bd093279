"""A worker stopped cleanly (SIGTERM) must not keep taking messages it will never run.

On SQS a receive is a long poll (``wait_time``, 20 s by default). A worker that abandoned its receives while
they wait on the server would leave the next messages to receives nobody reads, hidden for their visibility
timeout (moto does this; SQS answers an abandoned long poll the same way). So the broker's close waits for its
long polls to end (``close_grace``, ``wait_time + 2`` s by default) and gives back what they received: the
messages its pollers received ahead of its handlers (up to ``prefetch``) are visible again at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import boto3
import pytest

from taskstream.brokers.sqs import SQSBroker
from taskstream.messages import Envelope
from taskstream.producer import Producer
from tests.e2e.conftest import SQS_ENDPOINT, SQS_PREFIX, Served, connected, unique
from tests.support.waiting import wait_for

BASE = f"sqs://us-east-1/?endpoint_url={SQS_ENDPOINT}&queue_prefix={SQS_PREFIX}&visibility_timeout=30"


async def hidden_after_stop(url: str, serve: Callable[..., Served]) -> tuple[int, int]:
    """Start a worker, stop it while it long-polls, publish 5 messages: (visible, hidden) on the server."""
    queue = unique("stopped")
    worker = serve(url, queue).start()
    await wait_for(
        lambda: "app started" in worker.output() or not worker.alive(), timeout=60, what="the worker to start"
    )
    await asyncio.sleep(1)  # its receives now wait on the server
    assert await worker.terminate() == 0, worker.output()[-3000:]
    sqs = boto3.client("sqs", endpoint_url=SQS_ENDPOINT, region_name="us-east-1")
    async with connected(url) as broker:
        try:
            for n in range(5):
                await broker.publish(queue, b'{"n": %d}' % n)
            await asyncio.sleep(1)  # an abandoned receive takes messages within milliseconds
            assert isinstance(broker, SQSBroker)
            queue_url = sqs.get_queue_url(QueueName=broker.sqs_name(queue))["QueueUrl"]
            names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
            counts = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
        finally:
            for name in (queue, broker.dead_letter_name(queue)):
                await broker.delete_queue(name)
    return int(counts[names[0]]), int(counts[names[1]])


@pytest.mark.sqs
async def test_messages_published_after_a_clean_stop_are_not_hidden(serve: Callable[..., Served]) -> None:
    assert await hidden_after_stop(BASE, serve) == (5, 0)


@pytest.mark.sqs
async def test_short_long_polls_and_a_close_grace_above_them_avoid_it(serve: Callable[..., Served]) -> None:
    """Short long polls with a close grace above them stop faster and hide nothing either (URL options)."""
    assert await hidden_after_stop(f"{BASE}&wait_time=1&close_grace=2", serve) == (5, 0)


HELD = 24  # published at once: the worker's pollers receive them all (prefetch 64), its 4 handlers run a few
SLOW = 1.0  # seconds per handler call: the first worker cannot finish many before it is stopped


@pytest.mark.sqs
async def test_a_stopping_worker_gives_back_what_its_long_polls_received(
    serve: Callable[..., Served], queues: Callable[[str, str], str]
) -> None:
    """Messages received ahead and waiting in the worker's buffer at SIGTERM are visible again at once.

    The visibility timeout is 60 s: within this test only a give-back can make a received message visible.
    """
    url = BASE.replace("visibility_timeout=30", "visibility_timeout=60") + "&wait_time=2"
    queue = queues(url, "held")
    worker = serve(url, queue, delay=SLOW).start()
    await wait_for(
        lambda: "app started" in worker.output() or not worker.alive(), timeout=60, what="the worker to start"
    )
    assert worker.alive(), worker.output()[-3000:]
    async with connected(url) as broker:
        # published while the worker's long polls wait on the server
        await Producer(broker).send_many(queue, [Envelope(body={"n": n}) for n in range(HELD)])

        async def all_received() -> bool:
            return (await broker.queue_stats(queue)).depth == 0

        await wait_for(all_received, timeout=30, what=f"the worker to receive all {HELD} messages")
        assert await worker.terminate() == 0, worker.output()[-3000:]
        finished = set(worker.seen())
        unfinished = set(range(HELD)) - finished
        # more than its 4 handlers held: the rest waited in the buffer, where only the give-back returns them
        assert len(unfinished) > 4, f"the worker finished {sorted(finished)} before the stop: nothing was tested"

        async def given_back() -> bool:
            stats = await broker.queue_stats(queue)  # depth: visible; in_flight: received and still hidden
            return (stats.depth, stats.in_flight) == (len(unfinished), 0)

        await wait_for(
            given_back,
            timeout=10,  # well before the 60 s visibility timeout
            what=f"the {len(unfinished)} unfinished messages to be visible again and none left hidden",
        )

    successor = serve(url, queue).start()  # a new worker, same app and queue: it runs every one of them
    await wait_for(
        lambda: set(successor.seen()) >= unfinished or not successor.alive(),
        timeout=40,  # still before the visibility timeout
        what="the new worker to run every message the stopped one gave back",
    )
    assert set(successor.seen()) == unfinished  # given back: all of them; finished and acked: none of them
    assert await successor.terminate() == 0, successor.output()[-3000:]
