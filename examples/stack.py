"""The compose stack's stream: the S8 sensor pipeline (``examples/sensor_windows.py``) as an endless live feed.

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
"""

from __future__ import annotations

from examples.sensor_windows import build_pipeline

__all__ = ["NAME", "RATE", "RESULTS_DB", "RESULTS_JSONL", "REPLICAS", "pipeline"]

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
