"""The compose stack: the S8 sensor pipeline (``examples/sensor_windows.py``) as an endless live feed, and tasks.

``docker-compose.yml`` runs every stage replica of ``pipeline`` as its own service, exactly as VMs would::

    taskstream pipeline run examples.stack:pipeline --stage windows --replica 0   # and 1, 2
    taskstream pipeline run examples.stack:pipeline --stage store --replica 0
    taskstream pipeline run examples.stack:pipeline --stage sensor --replica 0

The sensor stage emits :data:`RATE` readings per second over four sensors, paced to the wall clock and never
ending, so the queues keep moving in the RabbitMQ management UI. The three ``windows`` replicas share the sensors
by key hash and compute 1 s tumbling and 2 s sliding event-time windows (mean, min, max, count); the ``store``
stage writes them to :data:`RESULTS_DB` (tables ``windows`` and ``late``) and :data:`RESULTS_JSONL`, relative to
its working directory (``/var/lib/taskstream`` in the image). Like every taskstream process it reads only
``TASKSTREAM_*`` variables: the broker from ``TASKSTREAM_BROKER_URL``, window snapshots from
``TASKSTREAM_STATE_URL`` (a SQLite file in the working directory by default).

``app`` holds the stack's example tasks, served by the ``worker`` service (``taskstream worker examples.stack:app``)
on the queue :data:`TASK_QUEUE`; call them from any client::

    taskstream submit estimate_pi 200000 7 --queue stack.tasks --wait
    taskstream submit window_stats '[20.5, 21.0, 19.75]' --queue stack.tasks --wait
"""

from __future__ import annotations

import random
import statistics

from examples.sensor_windows import build_pipeline
from taskstream import App

__all__ = [
    "NAME",
    "RATE",
    "REPLICAS",
    "RESULTS_DB",
    "RESULTS_JSONL",
    "TASK_QUEUE",
    "app",
    "estimate_pi",
    "pipeline",
    "window_stats",
]

NAME = "sensor-stack"
RATE = 200.0
REPLICAS = 3
RESULTS_DB = "results/sensor_windows.db"
RESULTS_JSONL = "results/windows.jsonl"

pipeline = build_pipeline(
    db=RESULTS_DB,
    jsonl=RESULTS_JSONL,
    count=None,  # type: ignore[arg-type]  # endless: the sensor never sends end-of-stream
    rate=RATE,
    replicas=REPLICAS,
    realtime=True,
    name=NAME,
)

TASK_QUEUE = "stack.tasks"

app = App()  # broker from TASKSTREAM_BROKER_URL


@app.task(queue=TASK_QUEUE, cpu_bound=True)
def estimate_pi(samples: int, seed: int = 0) -> float:
    """Monte Carlo estimate of pi from ``samples`` random points (CPU-bound: runs on worker processes)."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


@app.task(queue=TASK_QUEUE)
def window_stats(values: list[float]) -> dict[str, float]:
    """The statistics of one window's readings, as the pipeline's window stage computes them."""
    return {"count": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values)}
