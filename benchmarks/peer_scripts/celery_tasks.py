"""Celery (prefork, concurrency = cores) on RabbitMQ with the rpc:// result backend: N no-op tasks, then
sequential round trips. Prints one JSON line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _harness import AMQP_URL, CORES, emit, latency_stats, start_worker, stop_worker

HERE = str(Path(__file__).resolve().parent)
APP_NAME = "celery_peer_app"

(Path(HERE) / f"{APP_NAME}.py").write_text(
    "from celery import Celery\n"
    f"app = Celery('peer', broker={AMQP_URL!r}, backend='rpc://')\n"
    "app.conf.update(task_serializer='json', result_serializer='json', worker_prefetch_multiplier=64,\n"
    "                task_default_queue='celery_peer_bench', broker_connection_retry_on_startup=True)\n"
    "@app.task\n"
    "def noop(i):\n"
    "    return i\n"
)


def main(n: int, sequential: int) -> None:
    sys.path.insert(0, HERE)
    import celery_peer_app as peer  # type: ignore[import-not-found]

    peer.app.control.purge()
    worker = start_worker(
        [sys.executable, "-m", "celery", "-A", APP_NAME, "worker", "--pool", "prefork",
         f"--concurrency={CORES}", "--loglevel=WARNING"], HERE,
    )
    try:
        peer.noop.delay(0).get(timeout=120)  # worker is up
        t0 = time.perf_counter()
        results = [peer.noop.delay(i) for i in range(n)]
        for r in results:
            r.get(timeout=300)
        elapsed = time.perf_counter() - t0
        samples = []
        for i in range(sequential):
            s = time.perf_counter()
            peer.noop.delay(i).get(timeout=60)
            samples.append(time.perf_counter() - s)
    finally:
        stop_worker(worker)
    emit({"peer": "celery", "throughput": n / elapsed, **latency_stats(samples)})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
