"""Dramatiq on RabbitMQ with the Redis results backend: N no-op tasks, then sequential round trips."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _harness import AMQP_URL, CORES, REDIS_URL, emit, latency_stats, start_worker, stop_worker

HERE = str(Path(__file__).resolve().parent)
APP_NAME = "dramatiq_peer_app"

(Path(HERE) / f"{APP_NAME}.py").write_text(
    "import dramatiq\n"
    "from dramatiq.brokers.rabbitmq import RabbitmqBroker\n"
    "from dramatiq.results import Results\n"
    "from dramatiq.results.backends import RedisBackend\n"
    f"broker = RabbitmqBroker(url={AMQP_URL!r})\n"
    f"broker.add_middleware(Results(backend=RedisBackend(url={REDIS_URL!r})))\n"
    "dramatiq.set_broker(broker)\n"
    "@dramatiq.actor(store_results=True, queue_name='dramatiq_peer_bench')\n"
    "def noop(i):\n"
    "    return i\n"
)


def main(n: int, sequential: int) -> None:
    sys.path.insert(0, HERE)
    import dramatiq_peer_app as peer  # type: ignore[import-not-found]

    peer.broker.flush_all()
    worker = start_worker(
        [sys.executable, "-m", "dramatiq", APP_NAME, "--processes", str(CORES), "--threads", "8"], HERE
    )
    try:
        peer.noop.send(0).get_result(block=True, timeout=120_000)
        t0 = time.perf_counter()
        messages = [peer.noop.send(i) for i in range(n)]
        for m in messages:
            m.get_result(block=True, timeout=300_000)
        elapsed = time.perf_counter() - t0
        samples = []
        for i in range(sequential):
            s = time.perf_counter()
            peer.noop.send(i).get_result(block=True, timeout=60_000)
            samples.append(time.perf_counter() - s)
    finally:
        stop_worker(worker)
    emit({"peer": "dramatiq", "throughput": n / elapsed, **latency_stats(samples)})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
