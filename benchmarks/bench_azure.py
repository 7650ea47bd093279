"""Azure Storage Queues: taskstream against the raw ``azure.storage.queue.aio`` SDK, same Azurite, same run.

Workloads (N small JSON envelopes, fresh queues each repetition, raw and taskstream alternating):

* publish: taskstream ``Producer.send_many`` (the broker sends 32 at a time) against raw ``send_message`` with
  32 in flight, in 8 alternating chunks so both sides see the same background load;
* consume: a taskstream ``Consumer`` (prefetch 64, concurrency 32, no-op handler, ack = delete with the pop
  receipt) against a raw loop that receives pages of 32 and deletes each message, 64 deletes in flight, the
  next page fetched while the deletes run; one run each per round, the order alternating between rounds.

Needs Azurite on 127.0.0.1:10001 (``bash scripts/services/azurite.sh``). Azurite moves only a few hundred
messages a second, so N is modest (``BENCH_AZURE_N``, default 400). Target: taskstream at least 0.8x raw.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azure.storage.queue.aio import QueueClient, QueueServiceClient
from common import Row, print_rows

from taskstream.brokers.azure_queues import AzureQueueBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.messages import Envelope, encode
from taskstream.producer import Producer

N = int(os.environ.get("BENCH_AZURE_N", "400"))
DEV = "UseDevelopmentStorage=true"
IN_FLIGHT = 32
TARGET = 0.8
CHUNKS = 8
STALL_TIMEOUT = 120.0  # fail instead of hanging when the queue runs dry or Azurite stalls


def _envelopes(n: int) -> list[Envelope]:
    return [Envelope(kind="record", body={"sensor": i % 7, "t": 20.0 + i / 100, "i": i}) for i in range(n)]


async def _gather_bounded(coros: list, limit: int) -> None:  # type: ignore[type-arg]
    slots = asyncio.Semaphore(limit)

    async def one(coro) -> None:  # type: ignore[no-untyped-def]
        async with slots:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def raw_publish(client: QueueClient, n: int) -> float:
    texts = [encode(e).decode() for e in _envelopes(n)]
    start = time.perf_counter()
    await _gather_bounded([client.send_message(t) for t in texts], IN_FLIGHT)
    return n / (time.perf_counter() - start)


async def taskstream_publish(broker: AzureQueueBroker, queue: str, n: int) -> float:
    envelopes = _envelopes(n)
    start = time.perf_counter()
    await Producer(broker).send_many(queue, envelopes)
    return n / (time.perf_counter() - start)


async def raw_consume(client: QueueClient, n: int) -> tuple[int, float]:
    """Receive pages of up to 32 and delete each message (64 deletes in flight) until ``n`` are deleted."""
    deleted = 0
    slots = asyncio.Semaphore(64)
    pending: set[asyncio.Task[None]] = set()

    async def delete(message: object) -> None:
        nonlocal deleted
        try:
            await client.delete_message(message)  # type: ignore[arg-type]
            deleted += 1
        finally:
            slots.release()

    start = time.perf_counter()
    received = 0
    deadline = start + STALL_TIMEOUT
    while received < n:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"raw consume stalled: {received} of {n} received")
        want = min(32, n - received)
        pager = client.receive_messages(messages_per_page=want, max_messages=want, visibility_timeout=30)
        page: list[object] = []
        async for batch in pager.by_page():
            page = [m async for m in batch]
            break
        if not page:
            await asyncio.sleep(0.05)
            continue
        received += len(page)
        for message in page:
            await slots.acquire()
            task = asyncio.create_task(delete(message))
            pending.add(task)
            task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return deleted, time.perf_counter() - start


async def taskstream_consume(broker: AzureQueueBroker, queue: str, n: int) -> tuple[int, float]:
    """A Consumer with a no-op handler until ``n`` messages are acked (stopping it is not timed)."""

    async def handle(message: Message) -> None:
        return None

    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=64, concurrency=32))
    start = time.perf_counter()
    await consumer.start()
    async with asyncio.timeout(STALL_TIMEOUT):
        while consumer.stats.acked < n:
            await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    acked = consumer.stats.acked
    await consumer.stop()
    return acked, elapsed


async def _consume_both(
    results: dict[str, float], client: QueueClient, broker: AzureQueueBroker, queue: str, n: int, raw_first: bool
) -> None:
    """Drain both queues of exactly ``n`` messages, one after the other (order alternates between rounds).

    Not chunked: stopping a consumer returns its prefetched messages, a cost steady-state consuming never pays.
    """
    order: list[tuple[str, Callable[[], Awaitable[tuple[int, float]]]]] = [
        ("raw_consume", lambda: raw_consume(client, n)),
        ("ts_consume", lambda: taskstream_consume(broker, queue, n)),
    ]
    if not raw_first:
        order.reverse()
    for name, run in order:
        cpu0 = time.process_time()
        done, elapsed = await run()
        results[name] = done / elapsed
        results[f"{name}_cpu_us"] = (time.process_time() - cpu0) / done * 1e6


async def _interleaved_publish(
    results: dict[str, float], client: QueueClient, broker: AzureQueueBroker, queue: str, n: int, raw_first: bool
) -> None:
    """Publish in CHUNKS alternating chunks so both sides see the same background noise."""
    chunk = max(1, n // CHUNKS)
    wall = {"raw_publish": 0.0, "ts_publish": 0.0}
    cpu = dict(wall)
    for i in range(CHUNKS):
        order: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("raw_publish", lambda: raw_publish(client, chunk)),
            ("ts_publish", lambda: taskstream_publish(broker, queue, chunk)),
        ]
        if (i % 2 == 0) != raw_first:
            order.reverse()
        for name, run in order:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await run()
            wall[name] += time.perf_counter() - wall0
            cpu[name] += time.process_time() - cpu0
    sent = chunk * CHUNKS
    for name in wall:
        results[name] = sent / wall[name]
        results[f"{name}_cpu_us"] = cpu[name] / sent * 1e6


async def one_round(n: int, raw_first: bool) -> dict[str, float]:
    """One repetition on fresh queues; ``raw_first`` alternates the order between repetitions."""
    tag = uuid.uuid4().hex[:8]
    names = {k: f"bench-{k}-{tag}" for k in ("rawpub", "tspub", "rawcon", "tscon")}
    service = QueueServiceClient.from_connection_string(DEV)
    broker = AzureQueueBroker.from_url("azurequeue://devstorage", visibility_timeout=30)
    results: dict[str, float] = {}
    async with service, broker:
        clients = {k: service.get_queue_client(v) for k, v in names.items()}
        for k, client in clients.items():
            if k.startswith("ts"):
                await broker.declare(names[k])
            else:
                await client.create_queue()
        try:
            await _interleaved_publish(results, clients["rawpub"], broker, names["tspub"], n, raw_first)
            await raw_publish(clients["rawcon"], n)  # both consume queues filled the same way
            await raw_publish(clients["tscon"], n)
            await _consume_both(results, clients["rawcon"], broker, names["tscon"], n, raw_first)
        finally:
            for name in [*names.values(), f"{names['tscon']}-poison"]:
                try:
                    await service.delete_queue(name)
                except Exception:
                    pass
    return results


def measure(repeats: int = 3) -> list[Row]:
    """Publish and consume rates of taskstream and the raw SDK, ``repeats`` alternating rounds on Azurite."""
    rounds = [asyncio.run(one_round(N, raw_first=i % 2 == 0)) for i in range(repeats)]

    def cpu(key: str) -> dict[str, object]:
        return {
            "n": N,
            "client_cpu_us_per_msg": statistics.median(r[f"ts_{key}_cpu_us"] for r in rounds),
            "baseline_client_cpu_us_per_msg": statistics.median(r[f"raw_{key}_cpu_us"] for r in rounds),
        }

    common = {"unit": "msg/s", "higher_is_better": True, "target": TARGET}
    return [
        Row(
            workload=f"azure publish {N} (Azurite)",
            subject="taskstream Producer.send_many",
            baseline="raw azure-storage-queue aio, 32 in flight",
            values=[r["ts_publish"] for r in rounds],
            baseline_values=[r["raw_publish"] for r in rounds],
            notes="both sides pay ~1.5 ms of SDK pipeline CPU per call; Azurite and the client share 2 cores",
            extra=cpu("publish"),
            **common,  # type: ignore[arg-type]
        ),
        Row(
            workload=f"azure consume+ack {N} (Azurite)",
            subject="taskstream Consumer prefetch 64",
            baseline="raw aio: pages of 32 + deletes, 64 in flight",
            values=[r["ts_consume"] for r in rounds],
            baseline_values=[r["raw_consume"] for r in rounds],
            extra=cpu("consume"),
            **common,  # type: ignore[arg-type]
        ),
    ]


if __name__ == "__main__":
    rows = measure(int(os.environ.get("BENCH_REPEATS", "3")))
    print_rows(rows)
    for row in rows:
        cpu_ts = row.extra["client_cpu_us_per_msg"]
        cpu_raw = row.extra["baseline_client_cpu_us_per_msg"]
        print(f"{row.workload:<34} client CPU per message: taskstream {cpu_ts:.0f} us, raw {cpu_raw:.0f} us")
