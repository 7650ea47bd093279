"""ZeroMQ: taskstream's queue device against raw pyzmq, same machine, same run.

Workloads (100-byte bodies, tcp on 127.0.0.1; the device runs as ``taskstream zmq-device`` in its own process):

* throughput: N messages through a device queue — a producer connection publishing batches of 1,000 (each
  confirmed by the device), a consumer connection with prefetch 2,000 acking every message — against a raw
  PUSH/PULL pair moving the same N bodies with no broker and no acks, in two styles: awaiting every send and
  recv (plain asyncio pyzmq), and draining with NOBLOCK (the fastest Python can read a socket);
* the consumer runtime: the same N as envelopes through ``Producer.send_many`` and a ``Consumer`` with a no-op
  handler (informational, same raw baseline);
* round trip: one task at a time, requester -> device -> echo worker process -> device -> requester, both
  messages acked, against a raw DEALER -> ROUTER echo process -> DEALER round trip (median latency).

taskstream packs many messages into one ZeroMQ frame each way (publish batches, deliveries, acks), where the raw
pair sends one frame per message as plain pyzmq code does; that, and the device being a second process on a
second core, is why the acked path can outrun the raw pair. The round trip has no such help: two hops through
the device plus a publish confirmation, three processes on the machine.

Target: throughput within 3x of raw pyzmq (ratio >= 0.33) while keeping acks. ``BENCH_ZMQ_N`` (default
100,000) and ``BENCH_ZMQ_RTT`` (round trips, default 1,000) change the volumes.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq
import zmq.asyncio
from common import Row, print_rows

from taskstream.brokers.base import Broker, OutgoingMessage, broker_from_url
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.messages import Envelope
from taskstream.producer import Producer

N = int(os.environ.get("BENCH_ZMQ_N", "100000"))
RTT = int(os.environ.get("BENCH_ZMQ_RTT", "1000"))
BODY = b"x" * 100
BATCH = 1000
TARGET = 1 / 3

RAW_ECHO = textwrap.dedent(
    """
    import sys, zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    while True:
        router.send_multipart(router.recv_multipart())
    """
)

TS_ECHO = textwrap.dedent(
    """
    import asyncio, sys
    from taskstream.brokers.base import broker_from_url

    async def main(url):
        async with broker_from_url(url) as broker:
            await broker.declare("rtt.req")
            await broker.declare("rtt.rep")
            print("ready", flush=True)
            async with broker.consume("rtt.req", prefetch=16) as sub:
                async for d in sub:
                    await broker.publish("rtt.rep", d.body, message_id=d.message_id)
                    await d.ack()

    asyncio.run(main(sys.argv[1]))
    """
)


class Process:
    """A helper process that prints one line when ready."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.lines: list[str] = []

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"helper process {self.proc.args!r} exited early")
        self.lines.append(line)
        return line

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_device() -> tuple[Process, str]:
    exe = Path(sys.executable).with_name("taskstream")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from taskstream.cli import main; main()"]
    device = Process(*cmd, "zmq-device", "--bind", "tcp://127.0.0.1:*")
    line = device.readline()
    return device, line.split("brokers use ")[1].rstrip(")")


# -- throughput -----------------------------------------------------------------------------------------


async def raw_push_pull(n: int, drain: bool) -> float:
    ctx = zmq.asyncio.Context.instance()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    raw_pull: zmq.Socket[bytes] = zmq.Socket.shadow(pull.underlying)

    async def receive() -> None:
        got = 0
        while got < n:
            await pull.recv()
            got += 1
            if drain:
                while got < n:
                    try:
                        raw_pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    got += 1

    try:
        start = time.perf_counter()
        receiver = asyncio.create_task(receive())
        for _ in range(n):
            await push.send(BODY)
        await receiver
        return n / (time.perf_counter() - start)
    finally:
        push.close(0)
        pull.close(0)


async def taskstream_queue(url: str, n: int) -> float:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    async with broker_from_url(url) as producer, broker_from_url(url) as consumer:
        await producer.declare(queue)
        batch = [OutgoingMessage(BODY) for _ in range(BATCH)]

        async def consume() -> None:
            got = 0
            async with consumer.consume(queue, prefetch=2 * BATCH) as sub:
                async for delivery in sub:
                    await delivery.ack()
                    got += 1
                    if got == n:
                        return

        async def produce() -> None:
            in_flight: set[asyncio.Task[None]] = set()
            for start in range(0, n, BATCH):
                size = min(BATCH, n - start)
                in_flight.add(asyncio.create_task(producer.publish_batch(queue, batch[:size])))
                if len(in_flight) >= 4:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
            await asyncio.gather(*in_flight)

        start = time.perf_counter()
        await asyncio.gather(consume(), produce())
        rate = n / (time.perf_counter() - start)
        await producer.delete_queue(queue)
    return rate


async def taskstream_runtime(url: str, n: int) -> float:
    queue = f"bench-rt-{uuid.uuid4().hex[:8]}"
    envelopes = [Envelope(kind="record", body={"i": i, "pad": "x" * 64}) for i in range(n)]
    done = asyncio.Event()
    handled = 0

    async def handle(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == n:
            done.set()

    async with broker_from_url(url) as producer, broker_from_url(url) as broker:
        consumer = Consumer(broker, queue, handle, ConsumerConfig(prefetch=2000, concurrency=500))
        await consumer.start()
        start = time.perf_counter()
        await Producer(producer).send_many(queue, envelopes)
        await done.wait()
        rate = n / (time.perf_counter() - start)
        await consumer.stop()
        await producer.delete_queue(queue)
    return rate


# -- round trip -----------------------------------------------------------------------------------------


async def raw_round_trip(port: int, count: int) -> float:
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        for _ in range(20):  # warm up
            await dealer.send(BODY)
            await dealer.recv()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await dealer.send(BODY)
            await dealer.recv()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000
    finally:
        dealer.close(0)


async def taskstream_round_trip(url: str, count: int) -> float:
    broker: Broker
    async with broker_from_url(url) as broker:
        await broker.declare("rtt.req")
        await broker.declare("rtt.rep")
        times = []
        async with broker.consume("rtt.rep", prefetch=1) as replies:
            for i in range(count + 20):
                start = time.perf_counter()
                await broker.publish("rtt.req", BODY, message_id=str(i))
                reply = await replies.__anext__()
                await reply.ack()
                if i >= 20:  # the first ones warm up
                    times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000


# -- the suite ------------------------------------------------------------------------------------------


def measure(repeats: int = 3) -> list[Row]:
    device, url = start_device()
    raw_echo = Process(sys.executable, "-c", RAW_ECHO)
    ts_echo = Process(sys.executable, "-c", TS_ECHO, url)
    try:
        echo_port = int(raw_echo.readline())
        ts_echo.readline()
        figures: dict[str, list[float]] = {k: [] for k in ("raw", "raw_drain", "queue", "runtime", "raw_rtt", "ts_rtt")}
        for _ in range(repeats):  # alternate, so drift and noise hit both sides
            figures["raw"].append(asyncio.run(raw_push_pull(N, drain=False)))
            figures["queue"].append(asyncio.run(taskstream_queue(url, N)))
            figures["raw_drain"].append(asyncio.run(raw_push_pull(N, drain=True)))
            figures["runtime"].append(asyncio.run(taskstream_runtime(url, N)))
            figures["raw_rtt"].append(asyncio.run(raw_round_trip(echo_port, RTT)))
            figures["ts_rtt"].append(asyncio.run(taskstream_round_trip(url, RTT)))
    finally:
        for proc in (ts_echo, raw_echo, device):
            proc.stop()
    extra: dict[str, Any] = {"n": N, "body_bytes": len(BODY), "batch": BATCH}
    return [
        Row(
            "zmq throughput (acked) vs PUSH/PULL",
            "device queue, batches of 1000, ack each",
            "raw PUSH/PULL, await each",
            "msg/s",
            figures["queue"],
            figures["raw"],
            target=TARGET,
            extra=extra,
        ),
        Row(
            "zmq throughput (acked) vs drained",
            "device queue, batches of 1000, ack each",
            "raw PUSH/PULL, NOBLOCK drain",
            "msg/s",
            figures["queue"],
            figures["raw_drain"],
            target=TARGET,
            extra=extra,
        ),
        Row(
            "zmq consumer runtime vs PUSH/PULL",
            "Producer.send_many + Consumer",
            "raw PUSH/PULL, await each",
            "msg/s",
            figures["runtime"],
            figures["raw"],
            notes="envelopes, decode and dispatch per message; informational",
            extra=extra,
        ),
        Row(
            "zmq task round trip",
            "publish -> device -> worker -> device, acked",
            "raw DEALER/ROUTER echo",
            "ms",
            figures["ts_rtt"],
            figures["raw_rtt"],
            higher_is_better=False,
            notes="median of single round trips; two extra hops through the device, worker prefetch 16",
            extra={"round_trips": RTT},
        ),
    ]


if __name__ == "__main__":
    print_rows(measure(int(os.environ.get("BENCH_REPEATS", "3"))))
