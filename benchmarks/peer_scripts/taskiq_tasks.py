"""TaskIQ with taskiq-aio-pika and the Redis result backend: N no-op tasks, then sequential round trips."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from _harness import AMQP_URL, CORES, REDIS_URL, emit, latency_stats, start_worker, stop_worker

HERE = str(Path(__file__).resolve().parent)
APP_NAME = "taskiq_peer_app"

(Path(HERE) / f"{APP_NAME}.py").write_text(
    "from taskiq_aio_pika import AioPikaBroker\n"
    "from taskiq_redis import RedisAsyncResultBackend\n"
    f"broker = AioPikaBroker({AMQP_URL!r}, queue_name='taskiq_peer_bench').with_result_backend(\n"
    f"    RedisAsyncResultBackend({REDIS_URL!r}))\n"
    "@broker.task\n"
    "async def noop(i):\n"
    "    return i\n"
)


async def run(n: int, sequential: int) -> dict[str, float]:
    sys.path.insert(0, HERE)
    import taskiq_peer_app as peer  # type: ignore[import-not-found]

    await peer.broker.startup()
    poll = 0.002  # results are polled from Redis; poll often so latency is not the poll interval
    try:
        await (await peer.noop.kiq(0)).wait_result(check_interval=poll, timeout=120)
        t0 = time.perf_counter()
        handles = [await peer.noop.kiq(i) for i in range(n)]
        await asyncio.gather(*(h.wait_result(check_interval=0.05, timeout=300) for h in handles))
        elapsed = time.perf_counter() - t0
        samples = []
        for i in range(sequential):
            s = time.perf_counter()
            await (await peer.noop.kiq(i)).wait_result(check_interval=poll, timeout=60)
            samples.append(time.perf_counter() - s)
    finally:
        await peer.broker.shutdown()
    return {"throughput": n / elapsed, **latency_stats(samples)}


def main(n: int, sequential: int) -> None:
    worker = start_worker([sys.executable, "-m", "taskiq", "worker", f"{APP_NAME}:broker", "--workers", str(CORES)],
                          HERE)
    try:
        result = asyncio.run(run(n, sequential))
    finally:
        stop_worker(worker)
    emit({"peer": "taskiq", **result})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
