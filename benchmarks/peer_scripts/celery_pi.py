"""S1 on Celery (prefork, concurrency = cores, RabbitMQ broker, rpc:// results)."""

from __future__ import annotations

import sys
from pathlib import Path

from _harness import AMQP_URL, CORES, emit, start_worker, stop_worker
from _pi import time_blocks

HERE = str(Path(__file__).resolve().parent)
APP_NAME = "celery_pi_app"

(Path(HERE) / f"{APP_NAME}.py").write_text(
    "from celery import Celery\n"
    "from _pi import pi as _pi\n"
    f"app = Celery('pi', broker={AMQP_URL!r}, backend='rpc://')\n"
    "app.conf.update(task_default_queue='celery_pi_bench', worker_prefetch_multiplier=1,\n"
    "                broker_connection_retry_on_startup=True)\n"
    "@app.task\n"
    "def pi(n):\n"
    "    return _pi(n)\n"
)


def main(n: int) -> None:
    sys.path.insert(0, HERE)
    import celery_pi_app as peer  # type: ignore[import-not-found]

    peer.app.control.purge()
    worker = start_worker([sys.executable, "-m", "celery", "-A", APP_NAME, "worker", "--pool", "prefork",
                           f"--concurrency={CORES}", "--loglevel=WARNING"], HERE)
    try:
        peer.pi.delay(1000).get(timeout=120)
        timings = time_blocks(lambda b, k: [r.get(timeout=300) for r in [peer.pi.delay(k) for _ in range(b)]], n)
    finally:
        stop_worker(worker)
    emit({"peer": "celery", "blocks": timings})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
