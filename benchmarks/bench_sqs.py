"""SQS: taskstream against raw aiobotocore on the same moto server, in the same run.

Workloads (N small JSON envelopes on fresh queues each repetition; raw and taskstream alternate in 4 chunks so
both see the same background load, and the side that goes first alternates between repetitions):

* publish: taskstream ``Producer.send_many`` (``SendMessageBatch`` of 10, ``IN_FLIGHT`` batches pipelined)
  against raw ``send_message_batch`` of 10 with ``IN_FLIGHT`` calls in flight;
* consume: a taskstream ``Consumer`` (prefetch 50, so 5 long polls in flight; concurrency 50; no-op handler;
  ack = delete, coalesced into ``DeleteMessageBatch``) against ``RECEIVERS`` raw loops that each receive up to
  10, then delete the page with one ``delete_message_batch`` while the next receive runs. Starting and stopping
  a consumer are timed, and everything either side deleted counts.

Needs moto's server (``bash scripts/services/sqs.sh``; ``TASKSTREAM_TEST_SQS_ENDPOINT`` for another server).
moto is slow and slows down with queue depth, so N is modest (``BENCH_SQS_N``, default 400).
Target: taskstream at least 0.8x raw.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from common import Row, print_rows

from taskstream.brokers.sqs import SQSBroker, SQSOptions
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.messages import Envelope, encode
from taskstream.producer import Producer

N = int(os.environ.get("BENCH_SQS_N", "400"))
ENDPOINT = os.environ.get("TASKSTREAM_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")
IN_FLIGHT = 8  # batch sends in flight, both sides
PREFETCH = 50  # taskstream: 5 receives in flight ...
RECEIVERS = 5  # ... raw: 5 receive loops
TARGET = 0.8
CHUNKS = 4

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def _envelopes(n: int) -> list[Envelope]:
    return [Envelope(kind="record", body={"sensor": i % 7, "t": 20.0 + i / 100, "i": i}) for i in range(n)]


async def raw_publish(client: Any, url: str, n: int) -> None:
    """``send_message_batch`` of 10, ``IN_FLIGHT`` calls at once."""
    texts = [encode(e).decode() for e in _envelopes(n)]
    batches = [texts[i : i + 10] for i in range(0, len(texts), 10)]
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def send(batch: list[str]) -> None:
        async with slots:
            response = await client.send_message_batch(
                QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": t} for i, t in enumerate(batch)]
            )
            assert not response.get("Failed"), response["Failed"]

    await asyncio.gather(*(send(b) for b in batches))


async def taskstream_publish(broker: SQSBroker, queue: str, n: int) -> None:
    await Producer(broker, max_in_flight=IN_FLIGHT).send_many(queue, _envelopes(n))


async def raw_consume(client: Any, url: str, n: int) -> tuple[int, float]:
    """``RECEIVERS`` loops: receive up to 10, delete the page in one batch call, until ``n`` are deleted."""
    deleted = 0
    deletes: set[asyncio.Task[None]] = set()

    async def delete(messages: list[dict[str, Any]]) -> None:
        nonlocal deleted
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        await client.delete_message_batch(QueueUrl=url, Entries=entries)
        deleted += len(messages)

    async def receiver() -> None:
        while deleted < n:
            response = await client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=30
            )
            messages = response.get("Messages", [])
            if messages:
                task = asyncio.create_task(delete(messages))
                deletes.add(task)
                task.add_done_callback(deletes.discard)
            elif deletes:
                await asyncio.gather(*list(deletes))

    start = time.perf_counter()
    await asyncio.gather(*(receiver() for _ in range(RECEIVERS)))
    await asyncio.gather(*list(deletes))
    return deleted, time.perf_counter() - start


async def taskstream_consume(broker: SQSBroker, queue: str, n: int) -> tuple[int, float]:
    """A Consumer with a no-op handler until ``n`` messages are acked, then stopped.

    Stopping is timed: handlers running at that moment still ack, and all acked messages are counted.
    """

    async def handle(message: Message) -> None:
        return None

    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=PREFETCH, concurrency=PREFETCH))
    start = time.perf_counter()
    await consumer.start()
    while consumer.stats.acked < n:
        await asyncio.sleep(0.005)
    await consumer.stop()
    return consumer.stats.acked, time.perf_counter() - start


async def _alternate(
    results: dict[str, float],
    runs: dict[str, Callable[[int], Awaitable[tuple[int, float] | None]]],
    n: int,
    raw_first: bool,
) -> None:
    """Run both sides in ``CHUNKS`` alternating chunks; record each side's rate and client CPU per message.

    A run returns ``None`` (it did exactly what it was asked, timed here) or ``(done, seconds)``: consumers may
    take a little more than asked, so each chunk asks for what is left, the last one for all of it.
    """
    chunk = max(1, n // CHUNKS)
    done = dict.fromkeys(runs, 0)
    wall = dict.fromkeys(runs, 0.0)
    cpu = dict.fromkeys(runs, 0.0)
    for i in range(CHUNKS):
        order = list(runs)
        if (i % 2 == 0) != raw_first:
            order.reverse()
        for name in order:
            left = n - done[name]
            want = left if i == CHUNKS - 1 else min(chunk, left)
            if want <= 0:
                continue
            cpu0, wall0 = time.process_time(), time.perf_counter()
            outcome = await runs[name](want)
            cpu[name] += time.process_time() - cpu0
            if outcome is None:
                done[name] += want
                wall[name] += time.perf_counter() - wall0
            else:
                done[name] += outcome[0]
                wall[name] += outcome[1]
    for name in runs:
        results[name] = done[name] / wall[name]
        results[f"{name}_cpu_us"] = cpu[name] / done[name] * 1e6


async def one_round(n: int, raw_first: bool) -> dict[str, float]:
    """One repetition on fresh queues."""
    tag = uuid.uuid4().hex[:8]
    broker = SQSBroker(SQSOptions(region="us-east-1", endpoint_url=ENDPOINT, queue_prefix=f"bench-{tag}-"))
    config = AioConfig(max_pool_connections=broker.options.max_connections)
    client_cm = get_session().create_client("sqs", region_name="us-east-1", endpoint_url=ENDPOINT, config=config)
    results: dict[str, float] = {}
    async with client_cm as client, broker:
        urls = {k: (await client.create_queue(QueueName=f"bench-raw{k}-{tag}"))["QueueUrl"] for k in ("pub", "con")}
        await broker.declare("tspub")
        await broker.declare("tscon")
        try:
            await _alternate(
                results,
                {
                    "raw_publish": lambda c: raw_publish(client, urls["pub"], c),
                    "ts_publish": lambda c: taskstream_publish(broker, "tspub", c),
                },
                n,
                raw_first,
            )
            # Fill both consume queues the same way (raw sends), then drain them chunk by chunk.
            await raw_publish(client, urls["con"], n)
            await raw_publish(client, broker._queues["tscon"].url, n)
            await _alternate(
                results,
                {
                    "raw_consume": lambda c: raw_consume(client, urls["con"], c),
                    "ts_consume": lambda c: taskstream_consume(broker, "tscon", c),
                },
                n,
                raw_first,
            )
        finally:
            for url in urls.values():
                await client.delete_queue(QueueUrl=url)
            for name in ("tspub", "tscon", broker.dead_letter_name("tscon")):
                await broker.delete_queue(name)
    return results


def measure(repeats: int = 3) -> list[Row]:
    """Publish and consume rates of taskstream and raw aiobotocore, ``repeats`` alternating rounds on moto."""
    rounds = [asyncio.run(one_round(N, raw_first=i % 2 == 0)) for i in range(repeats)]

    def cpu(key: str) -> dict[str, object]:
        return {
            "n": N,
            "client_cpu_us_per_msg": statistics.median(r[f"ts_{key}_cpu_us"] for r in rounds),
            "baseline_client_cpu_us_per_msg": statistics.median(r[f"raw_{key}_cpu_us"] for r in rounds),
        }

    common: dict[str, Any] = {"unit": "msg/s", "higher_is_better": True, "target": TARGET}
    return [
        Row(
            workload=f"sqs publish {N} (moto)",
            subject="taskstream Producer.send_many",
            baseline=f"raw aiobotocore send_message_batch, {IN_FLIGHT} in flight",
            values=[r["ts_publish"] for r in rounds],
            baseline_values=[r["raw_publish"] for r in rounds],
            notes="moto serves each call slowly; both sides send 10 per call",
            extra=cpu("publish"),
            **common,
        ),
        Row(
            workload=f"sqs receive+delete {N} (moto)",
            subject=f"taskstream Consumer prefetch {PREFETCH}",
            baseline=f"raw aiobotocore: {RECEIVERS} receive loops + delete_message_batch",
            values=[r["ts_consume"] for r in rounds],
            baseline_values=[r["raw_consume"] for r in rounds],
            notes="taskstream acks one by one; acks arriving together share DeleteMessageBatch calls",
            extra=cpu("consume"),
            **common,
        ),
    ]


if __name__ == "__main__":
    rows = measure(int(os.environ.get("BENCH_REPEATS", "3")))
    print_rows(rows)
    for row in rows:
        cpu_ts = row.extra["client_cpu_us_per_msg"]
        cpu_raw = row.extra["baseline_client_cpu_us_per_msg"]
        print(f"{row.workload:<34} client CPU per message: taskstream {cpu_ts:.0f} us, raw {cpu_raw:.0f} us")
