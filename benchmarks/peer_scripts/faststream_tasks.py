"""FastStream request/reply on RabbitMQ: N no-op requests in flight, then sequential round trips."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from _harness import AMQP_URL, emit, latency_stats, start_worker, stop_worker

HERE = str(Path(__file__).resolve().parent)
APP_NAME = "faststream_peer_app"

(Path(HERE) / f"{APP_NAME}.py").write_text(
    "from faststream import FastStream\n"
    "from faststream.rabbit import RabbitBroker\n"
    f"broker = RabbitBroker({AMQP_URL!r})\n"
    "app = FastStream(broker)\n"
    "@broker.subscriber('faststream_peer_bench')\n"
    "async def noop(i: int) -> int:\n"
    "    return i\n"
)


async def run(n: int, sequential: int) -> dict[str, float]:
    from faststream.rabbit import RabbitBroker

    async with RabbitBroker(AMQP_URL) as broker:
        async def call(i: int, timeout: float = 60) -> None:
            response = await broker.request(i, queue="faststream_peer_bench", timeout=timeout)
            await response.decode()

        for _ in range(120):  # wait for the service to start
            try:
                await call(0, timeout=1)
                break
            except Exception:
                await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        gate = asyncio.Semaphore(int(sys.argv[3]) if len(sys.argv) > 3 else 100)

        async def bounded(i: int) -> None:
            async with gate:
                await call(i)

        await asyncio.gather(*(bounded(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        samples = []
        for i in range(sequential):
            s = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - s)
    return {"throughput": n / elapsed, **latency_stats(samples)}


def main(n: int, sequential: int) -> None:
    worker = start_worker([sys.executable, "-m", "faststream", "run", f"{APP_NAME}:app"], HERE)
    try:
        result = asyncio.run(run(n, sequential))
    finally:
        stop_worker(worker)
    emit({"peer": "faststream", **result})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
