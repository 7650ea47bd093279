"""Memory: peak RSS of a worker idle and under load, and of a pipeline whose sink is slower than its source.

Rows (RSS in MiB, read from ``/proc/<pid>/status`` of a separate process; lower is better):

1. *worker idle*: ``taskstream run examples.two_stage:app`` on RabbitMQ, connected and consuming, against a bare
   interpreter holding one raw aio-pika connection (what any AMQP consumer pays).
2. *worker under load*: the same worker's peak while 10,000 plain-JSON orders flow through both stages,
   against its own idle figure: the ratio shows how much load adds (bounded prefetch keeps it small).
3. *slow-sink pipeline*: the peak of a fused pipeline (sensor -> map -> a sink slower than the source) after
   40,000 records, against the same pipeline after 4,000: bounded memory means a ratio near 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import Row, print_rows  # noqa: E402

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
LOAD_MESSAGES = 10_000


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found for pid {pid}")


BARE_CLIENT = textwrap.dedent(
    f"""
    import asyncio, aio_pika, sys
    async def main():
        conn = await aio_pika.connect_robust({AMQP_URL!r})
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue("bench-memory-bare", durable=True)
        await queue.consume(lambda m: m.ack())
        print("ready", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


def bare_client_rss() -> float:
    proc = subprocess.Popen([sys.executable, "-c", BARE_CLIENT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(1.0)
        return status_mib(proc.pid, "VmRSS")
    finally:
        proc.kill()
        proc.wait()


async def _flood_and_wait(n: int) -> None:
    import aio_pika
    import orjson

    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        out = await channel.declare_queue("orders.out", passive=True)  # declared by the worker, with its arguments
        await out.purge()
        for start in range(0, n, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(orjson.dumps({"item": "fig", "quantity": i}), content_type="application/json"),
                        routing_key="orders.in",
                    )
                    for i in range(start, min(n, start + 500))
                )
            )
        while True:
            declared = await channel.channel.queue_declare("orders.out", passive=True)
            if declared.message_count >= n:
                break
            await asyncio.sleep(0.2)
        await out.purge()


def worker_rss() -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskstream.cli", "run", "examples.two_stage:app", "--broker", AMQP_URL],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4.0)  # connected and consuming
        idle = status_mib(proc.pid, "VmRSS")
        asyncio.run(_flood_and_wait(LOAD_MESSAGES))
        peak = status_mib(proc.pid, "VmHWM")
        return idle, peak
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


SLOW_SINK_PIPELINE = textwrap.dedent(
    """
    import asyncio, sys
    from taskstream.stream_ops import CallbackSink, Pipeline, SimulatedSensor

    async def slow(item):
        await asyncio.sleep(0.0001)

    async def main(count):
        p = Pipeline("slow-sink")
        p.source("sensor", SimulatedSensor(8, rate=1000, count=count, start=0.0)).map(lambda r: r).sink(
            CallbackSink(slow))
        await p.run("memory://")
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                print(int(line.split()[1]) / 1024, flush=True)

    asyncio.run(main(int(sys.argv[1])))
    """
)


def pipeline_peak(count: int) -> float:
    result = subprocess.run(
        [sys.executable, "-c", SLOW_SINK_PIPELINE, str(count)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return float(result.stdout.strip().splitlines()[-1])


def measure(repeats: int = 3) -> list[Row]:
    bare, idle, peak, small, large = [], [], [], [], []
    for i in range(repeats):
        print(f"  memory: repetition {i + 1}/{repeats}", flush=True)
        bare.append(bare_client_rss())
        worker_idle, worker_peak = worker_rss()
        idle.append(worker_idle)
        peak.append(worker_peak)
        small.append(pipeline_peak(4_000))
        large.append(pipeline_peak(40_000))
    return [
        Row(
            "worker idle RSS",
            "taskstream run (RabbitMQ)",
            "bare aio-pika consumer",
            "MiB",
            idle,
            bare,
            higher_is_better=False,
            notes="informational: the cost of the framework at rest",
        ),
        Row(
            f"worker peak RSS, {LOAD_MESSAGES:,} msgs",
            "taskstream run (RabbitMQ)",
            "same worker idle",
            "MiB",
            peak,
            idle,
            higher_is_better=False,
            target=0.67,
            notes="target: load adds at most half of the idle footprint",
        ),
        Row(
            "slow-sink pipeline peak RSS",
            "40,000 records",
            "4,000 records",
            "MiB",
            large,
            small,
            higher_is_better=False,
            target=0.9,
            notes="bounded: 10x the records, about the same memory",
        ),
    ]


if __name__ == "__main__":
    print_rows(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
