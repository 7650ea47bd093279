"""RabbitMQ: taskstream against raw aio-pika, publisher confirms on in both, same server, same run.

Workloads (N small JSON envelopes, ~90 bytes, persistent; fresh queues each repetition; raw and taskstream
alternate in CHUNKS chunks so both see the same background load):

* publish: taskstream ``Producer.send_many`` (encodes the envelopes, batches of 1,000 pipelined) against raw
  aio-pika ``default_exchange.publish`` of the same bytes and properties (encoded into ``aio_pika.Message``
  inside the timed region too), confirms awaited with ``gather`` in chunks of 1,000;
* consume: a taskstream ``Consumer`` (prefetch 1,000, concurrency 64, no-op handler: decode, run, ack) against
  a raw aio-pika consumer (QoS 1,000, a callback that acks each message). Each chunk starts a consumer (timed)
  until the chunk is acked, then stops it (not timed).

Needs RabbitMQ on 127.0.0.1:5672 (``bash scripts/services/rabbitmq.sh``); ``BENCH_AMQP_URL`` points elsewhere,
``BENCH_RABBITMQ_N`` changes N (default 50,000). Target: taskstream at least 0.8x raw aio-pika.
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

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from common import Row, print_rows

from taskstream.brokers.rabbitmq import RabbitMQBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.messages import Envelope, encode
from taskstream.producer import Producer, broker_headers

N = int(os.environ.get("BENCH_RABBITMQ_N", "50000"))
URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
CHUNKS = 4
PIPELINE = 1000
PREFETCH = 1000
CONCURRENCY = 64
TARGET = 0.8


def _envelopes(n: int) -> list[Envelope]:
    return [Envelope(kind="record", body={"sensor": i % 7, "t": 20.0 + i / 100, "i": i}) for i in range(n)]


def _raw_messages(n: int) -> list[aio_pika.Message]:
    """The same bytes and properties taskstream sends, as aio-pika messages."""
    messages = []
    for envelope in _envelopes(n):
        headers = broker_headers(envelope)
        content_type = headers.pop("content_type")
        messages.append(
            aio_pika.Message(
                encode(envelope),
                headers=headers,
                content_type=content_type,
                message_id=envelope.id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
        )
    return messages


async def raw_publish(channel: AbstractChannel, queue: str, n: int) -> None:
    exchange = channel.default_exchange
    messages = _raw_messages(n)
    for start in range(0, n, PIPELINE):
        await asyncio.gather(*(exchange.publish(m, routing_key=queue) for m in messages[start : start + PIPELINE]))


async def taskstream_publish(broker: RabbitMQBroker, queue: str, n: int) -> None:
    await Producer(broker).send_many(queue, _envelopes(n))


async def raw_consume(connection: aio_pika.abc.AbstractConnection, queue: str, n: int) -> tuple[int, float]:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.get_queue(queue)
    done = asyncio.get_running_loop().create_future()
    acked = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal acked
        if acked >= n:
            return  # beyond this chunk: left unacked, the server requeues it when the channel closes
        acked += 1
        await message.ack()
        if acked >= n and not done.done():
            done.set_result(None)

    start = time.perf_counter()
    tag = await q.consume(on_message)
    await done
    elapsed = time.perf_counter() - start
    await q.cancel(tag)
    await channel.close()
    return acked, elapsed


async def taskstream_consume(broker: RabbitMQBroker, queue: str, n: int) -> tuple[int, float]:
    async def handle(message: Message) -> None:
        return None

    consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=PREFETCH, concurrency=CONCURRENCY))
    start = time.perf_counter()
    await consumer.start()
    while consumer.stats.acked < n:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - start
    acked = consumer.stats.acked
    await consumer.stop()
    return acked, elapsed


async def _alternate(
    results: dict[str, float],
    runs: dict[str, Callable[[int], Awaitable[tuple[int, float]]]],
    n: int,
    raw_first: bool,
) -> None:
    """Run both sides in CHUNKS alternating chunks; record rate and client CPU per message."""
    chunk = max(1, n // CHUNKS)
    count = dict.fromkeys(runs, 0)
    wall = dict.fromkeys(runs, 0.0)
    cpu = dict.fromkeys(runs, 0.0)
    for i in range(CHUNKS):
        order = list(runs.items())
        if (i % 2 == 0) != raw_first:
            order.reverse()
        for name, run in order:
            cpu0 = time.process_time()
            done, elapsed = await run(chunk)
            cpu[name] += time.process_time() - cpu0
            count[name] += done
            wall[name] += elapsed
    for name in runs:
        results[name] = count[name] / wall[name]
        results[f"{name}_cpu_us"] = cpu[name] / count[name] * 1e6


def _timed(coro_fn: Callable[[int], Awaitable[None]]) -> Callable[[int], Awaitable[tuple[int, float]]]:
    async def run(n: int) -> tuple[int, float]:
        start = time.perf_counter()
        await coro_fn(n)
        return n, time.perf_counter() - start

    return run


async def one_round(n: int, raw_first: bool) -> dict[str, float]:
    """One repetition on fresh queues; ``raw_first`` alternates the order between repetitions."""
    tag = uuid.uuid4().hex[:8]
    names = {k: f"bench-{k}-{tag}" for k in ("rawpub", "tspub", "rawcon", "tscon")}
    connection = await aio_pika.connect(URL)
    broker = RabbitMQBroker.from_url(URL)
    results: dict[str, float] = {}
    async with connection, broker:
        channel = await connection.channel(publisher_confirms=True)
        for name in names.values():
            await broker.declare(name)
        try:
            await _alternate(
                results,
                {
                    "raw_publish": _timed(lambda k: raw_publish(channel, names["rawpub"], k)),
                    "ts_publish": _timed(lambda k: taskstream_publish(broker, names["tspub"], k)),
                },
                n,
                raw_first,
            )
            # both consume queues filled the same way, by raw aio-pika; a stopping Consumer may ack up to
            # CONCURRENCY messages past its chunk (handlers already running finish), hence the slack
            await raw_publish(channel, names["rawcon"], n + CHUNKS * CONCURRENCY)
            await raw_publish(channel, names["tscon"], n + CHUNKS * CONCURRENCY)
            await _alternate(
                results,
                {
                    "raw_consume": lambda k: raw_consume(connection, names["rawcon"], k),
                    "ts_consume": lambda k: taskstream_consume(broker, names["tscon"], k),
                },
                n,
                raw_first,
            )
        finally:
            for name in [*names.values(), *(f"{v}.dlq" for v in names.values())]:
                try:
                    await broker.delete_queue(name)
                except Exception:
                    pass
    return results


def measure(repeats: int = 3) -> list[Row]:
    """Publish and consume rates of taskstream and raw aio-pika, ``repeats`` alternating rounds."""
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
            workload=f"rabbitmq publish {N} (confirms)",
            subject="taskstream Producer.send_many",
            baseline=f"raw aio-pika, gather of {PIPELINE}",
            values=[r["ts_publish"] for r in rounds],
            baseline_values=[r["raw_publish"] for r in rounds],
            notes="both sides encode the envelopes inside the timed region (raw: into aio_pika.Message)",
            extra=cpu("publish"),
            **common,  # type: ignore[arg-type]
        ),
        Row(
            workload=f"rabbitmq consume+ack {N}",
            subject=f"taskstream Consumer prefetch {PREFETCH}",
            baseline=f"raw aio-pika consume, QoS {PREFETCH}, ack each",
            values=[r["ts_consume"] for r in rounds],
            baseline_values=[r["raw_consume"] for r in rounds],
            notes="taskstream's figure includes decoding each envelope and running the handler",
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
