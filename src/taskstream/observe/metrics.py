"""Prometheus metrics of the message path, recorded in one place: the intake and the producer.

Every reader (consumers, task workers, stream stage replicas, ``QueueSource``, services, reply listeners) reads
through :class:`~taskstream.intake.Intake` and every publisher goes through
:class:`~taskstream.producer.Producer`; both look up the :class:`Recorder` attached to their broker once, when
they are built. A broker with no recorder gets :data:`NOOP`, whose methods do nothing: no allocation and no lock
per message when metrics are off, and ``prometheus-client`` is not even imported.

Counters of stream steps and the in-flight gauge are read from the runtimes' own counters when Prometheus
scrapes (a collector), so they cost nothing per record. Queue and dead-letter depths are polled in the
background by :meth:`Recorder.poll_depths` (the App runs it; so does ``taskstream pipeline run``).

The names, types and labels are listed in ``docs/observability.md`` (one table) and in :data:`METRICS`.

Example:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> recorder = Recorder(CollectorRegistry())
    >>> recorder.published("orders", 2, recorder.timer())
    >>> b'taskstream_messages_published_total{queue="orders"} 2.0' in generate_latest(recorder.registry)
    True
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from taskstream.errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from taskstream.brokers.base import Broker
    from taskstream.intake import Intake
    from taskstream.stream_ops.runtime_context import RuntimeContext

__all__ = [
    "DEFAULT_DEPTH_INTERVAL",
    "METRICS",
    "NOOP",
    "QueueMetrics",
    "Recorder",
    "attach",
    "reason_class",
    "recorder_for",
    "resolve",
]

log = logging.getLogger("taskstream.metrics")

#: seconds between two polls of queue and dead-letter depths
DEFAULT_DEPTH_INTERVAL = 5.0

#: name -> (type, labels, help): the whole catalogue (docs/observability.md has the same table)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "taskstream_messages_received_total": ("counter", ("queue",), "Deliveries read from the queue."),
    "taskstream_messages_handled_total": ("counter", ("queue",), "Deliveries handled and acked."),
    "taskstream_messages_retried_total": ("counter", ("queue",), "Deliveries requeued for another attempt."),
    "taskstream_messages_dead_lettered_total": (
        "counter",
        ("queue", "reason"),
        "Deliveries sent to the dead-letter queue, by reason class.",
    ),
    "taskstream_handler_duration_seconds": ("histogram", ("queue",), "Time a handler took, when it succeeded."),
    "taskstream_messages_in_flight": ("gauge", ("queue",), "Deliveries being handled now."),
    "taskstream_messages_published_total": ("counter", ("queue",), "Messages the broker accepted."),
    "taskstream_publish_errors_total": ("counter", ("queue",), "Publish calls that failed."),
    "taskstream_publish_duration_seconds": (
        "histogram",
        ("queue",),
        "Time from publish to the broker's confirm, per publish call (one message or a batch).",
    ),
    "taskstream_queue_depth": ("gauge", ("queue",), "Messages waiting in the queue (polled)."),
    "taskstream_dead_letter_depth": ("gauge", ("queue",), "Messages in the queue's dead-letter queue (polled)."),
    "taskstream_tasks_submitted_total": ("counter", ("task",), "Tasks submitted by this client."),
    "taskstream_tasks_finished_total": ("counter", ("task", "status"), "Tasks this worker finished, by status."),
    "taskstream_task_run_seconds": ("histogram", ("task",), "Time a task ran on this worker."),
    "taskstream_stream_records_in_total": ("counter", ("pipeline", "stage", "step"), "Records into a step."),
    "taskstream_stream_records_out_total": ("counter", ("pipeline", "stage", "step"), "Records out of a step."),
    "taskstream_stream_late_records_total": (
        "counter",
        ("pipeline", "stage", "step"),
        "Records behind the watermark (side output).",
    ),
    "taskstream_stream_dead_lettered_total": (
        "counter",
        ("pipeline", "stage", "step"),
        "Records a step's function failed on (dead-lettered).",
    ),
    "taskstream_stream_snapshot_seconds": ("histogram", ("pipeline", "stage"), "Time to commit a stage snapshot."),
    "taskstream_stream_snapshot_rows": ("histogram", ("pipeline", "stage"), "Rows (keys) written per snapshot."),
}

#: ``x-death-reason`` prefixes -> the ``reason`` label (anything else is ``failed`` when retries ran out, or
#: ``other``)
_REASONS = (
    ("message of ", "too_large"),
    ("malformed message", "malformed"),
    ("payload unavailable", "payload"),
    ("unreadable message", "unreadable"),
    ("failed ", "failed"),
    ("rejected by handler", "rejected"),
    ("ValidationFailed", "invalid"),
)


def reason_class(reason: str) -> str:
    """The ``reason`` label of a dead letter: a small fixed set, never the free text.

    Example:
        >>> reason_class("malformed message: not JSON"), reason_class("failed 3 times (max_attempts=3); ...")
        ('malformed', 'failed')
    """
    for prefix, label in _REASONS:
        if reason.startswith(prefix):
            return label
    return "other"


class QueueMetrics:
    """The metrics of one queue, as a reader records them; this base does nothing (metrics off)."""

    __slots__ = ()

    def timer(self) -> float:
        """A start time for :meth:`handler_time` (``0.0`` when off, so nothing is measured)."""
        return 0.0

    def received(self) -> None:
        """A delivery was read."""

    def handled(self, count: int = 1) -> None:
        """``count`` deliveries were handled and acked."""

    def handler_time(self, started: float) -> None:
        """A handler returned; it started at ``started`` (from :meth:`timer`)."""

    def retried(self) -> None:
        """A delivery was requeued for another attempt."""

    def dead_lettered(self, reason: str) -> None:
        """A delivery went to the dead-letter queue with ``reason``."""


class Recorder:
    """Metrics off: every method does nothing (see :class:`PrometheusRecorder` for the real one)."""

    enabled = False
    registry: Any = None

    def timer(self) -> float:
        """A start time for the duration methods (``0.0`` when off, so nothing is measured)."""
        return 0.0

    def for_intake(self, intake: Intake) -> QueueMetrics:
        """The metrics an intake records into (its queue's)."""
        return _NOOP_QUEUE

    def published(self, queue: str, count: int, started: float) -> None:
        """``count`` messages were accepted by the broker for ``queue``, in one call begun at ``started``."""

    def publish_failed(self, queue: str) -> None:
        """A publish to ``queue`` failed."""

    def tasks_submitted(self, task: str, count: int = 1) -> None:
        """``count`` calls of ``task`` were submitted."""

    def task_finished(self, task: str, status: str, seconds: float | None) -> None:
        """A worker finished ``task`` with ``status`` after running ``seconds``."""

    def watch_runtime(self, ctx: RuntimeContext) -> None:
        """Report a stream runtime's step counters at scrape time."""

    def snapshot(self, pipeline: str, stage: str | None, started: float, rows: int) -> None:
        """A stage committed a snapshot of ``rows`` rows, begun at ``started``."""

    async def poll_depths(self, broker: Broker, interval: float | None = None) -> None:
        """Poll queue and dead-letter depths forever (returns at once when off)."""


_NOOP_QUEUE = QueueMetrics()
NOOP = Recorder()
"""The recorder of every broker nobody attached one to."""

_attached: weakref.WeakKeyDictionary[Any, Recorder] = weakref.WeakKeyDictionary()


def attach(broker: Broker, recorder: Recorder) -> None:
    """Make ``recorder`` the one every intake and producer built on ``broker`` from now on records into."""
    _attached[broker] = recorder


def recorder_for(broker: Broker) -> Recorder:
    """The recorder attached to ``broker``, else :data:`NOOP`."""
    return _attached.get(broker, NOOP)


def resolve(
    metrics: bool | CollectorRegistry | Recorder | None, *, depth_interval: float = DEFAULT_DEPTH_INTERVAL
) -> Recorder:
    """The recorder ``App(metrics=...)`` asks for: ``False``/``None`` off, ``True`` a registry of its own, a
    ``CollectorRegistry`` to register into, or a :class:`Recorder`.

    Raises:
        ConfigurationError: ``prometheus-client`` is not installed, or ``metrics`` is none of the above.
    """
    if metrics is None or metrics is False:
        return NOOP
    if isinstance(metrics, Recorder):
        return metrics
    try:
        from prometheus_client import CollectorRegistry
    except ModuleNotFoundError:
        raise ConfigurationError("metrics need prometheus-client: pip install 'taskstream[metrics]'") from None
    if metrics is True:
        from prometheus_client import ProcessCollector

        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        return PrometheusRecorder(registry, depth_interval=depth_interval)
    if isinstance(metrics, CollectorRegistry):
        return PrometheusRecorder(metrics, depth_interval=depth_interval)
    raise ConfigurationError(
        f"metrics must be True, False, a prometheus_client CollectorRegistry or a Recorder, "
        f"not {type(metrics).__name__}"
    )


class _LiveQueue(QueueMetrics):
    __slots__ = ("_dead", "_dead_counter", "_duration", "_handled", "_queue", "_received", "_retried")

    def __init__(self, recorder: PrometheusRecorder, queue: str) -> None:
        self._queue = queue
        self._received = recorder.m_received.labels(queue)
        self._handled = recorder.m_handled.labels(queue)
        self._retried = recorder.m_retried.labels(queue)
        self._duration = recorder.m_handler.labels(queue)
        self._dead_counter = recorder.m_dead
        self._dead: dict[str, Any] = {}

    def timer(self) -> float:
        return time.perf_counter()

    def received(self) -> None:
        self._received.inc()

    def handled(self, count: int = 1) -> None:
        self._handled.inc(count)

    def handler_time(self, started: float) -> None:
        self._duration.observe(time.perf_counter() - started)

    def retried(self) -> None:
        self._retried.inc()

    def dead_lettered(self, reason: str) -> None:
        label = reason_class(reason)
        child = self._dead.get(label)
        if child is None:
            child = self._dead[label] = self._dead_counter.labels(self._queue, label)
        child.inc()


class PrometheusRecorder(Recorder):
    """Records into a ``prometheus_client`` registry.

    Args:
        registry: where the metrics are registered (one recorder per registry).
        depth_interval: seconds between two polls of queue depths.
    """

    enabled = True

    def __init__(self, registry: CollectorRegistry, *, depth_interval: float = DEFAULT_DEPTH_INTERVAL) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.depth_interval = depth_interval
        made: dict[str, Any] = {}
        kinds: dict[str, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        for name, (kind, labels, doc) in METRICS.items():
            if name in _COLLECTED:
                continue
            base = name.removesuffix("_total") if kind == "counter" else name
            made[name] = kinds[kind](base, doc, labels, registry=registry)
        self.m_received = made["taskstream_messages_received_total"]
        self.m_handled = made["taskstream_messages_handled_total"]
        self.m_retried = made["taskstream_messages_retried_total"]
        self.m_dead = made["taskstream_messages_dead_lettered_total"]
        self.m_handler = made["taskstream_handler_duration_seconds"]
        self.m_published = made["taskstream_messages_published_total"]
        self.m_publish_errors = made["taskstream_publish_errors_total"]
        self.m_publish_time = made["taskstream_publish_duration_seconds"]
        self.m_depth = made["taskstream_queue_depth"]
        self.m_dead_depth = made["taskstream_dead_letter_depth"]
        self.m_submitted = made["taskstream_tasks_submitted_total"]
        self.m_finished = made["taskstream_tasks_finished_total"]
        self.m_run = made["taskstream_task_run_seconds"]
        self.m_snapshot = made["taskstream_stream_snapshot_seconds"]
        self.m_snapshot_rows = made["taskstream_stream_snapshot_rows"]
        self._queues: dict[str, _LiveQueue] = {}
        self._dead_letter_of: dict[str, str] = {}  # queue -> its dead-letter queue (polled)
        self._intakes: weakref.WeakSet[Intake] = weakref.WeakSet()
        self._runtimes: weakref.WeakValueDictionary[int, RuntimeContext] = weakref.WeakValueDictionary()
        self._publishers: dict[str, tuple[Any, Any]] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        registry.register(_Collector(self))

    def timer(self) -> float:
        return time.perf_counter()

    def for_intake(self, intake: Intake) -> QueueMetrics:
        queue = intake.queue
        self._intakes.add(intake)
        self._dead_letter_of[queue] = intake.dead_letter_queue
        live = self._queues.get(queue)
        if live is None:
            live = self._queues[queue] = _LiveQueue(self, queue)
        return live

    def published(self, queue: str, count: int, started: float) -> None:
        pair = self._publishers.get(queue)
        if pair is None:
            pair = self._publishers[queue] = (self.m_published.labels(queue), self.m_publish_time.labels(queue))
        pair[0].inc(count)
        pair[1].observe(time.perf_counter() - started)

    def publish_failed(self, queue: str) -> None:
        self.m_publish_errors.labels(queue).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (``labels()`` takes a lock and builds a key every call)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def tasks_submitted(self, task: str, count: int = 1) -> None:
        self._child(self.m_submitted, task).inc(count)

    def task_finished(self, task: str, status: str, seconds: float | None) -> None:
        self._child(self.m_finished, task, status).inc()
        if seconds is not None:
            self._child(self.m_run, task).observe(max(0.0, seconds))

    def watch_runtime(self, ctx: RuntimeContext) -> None:
        self._runtimes[id(ctx)] = ctx  # contexts are dataclasses: compared by value, so kept by identity

    def snapshot(self, pipeline: str, stage: str | None, started: float, rows: int) -> None:
        self.m_snapshot.labels(pipeline, stage or "").observe(time.perf_counter() - started)
        self.m_snapshot_rows.labels(pipeline, stage or "").observe(rows)

    async def poll_depths(self, broker: Broker, interval: float | None = None) -> None:
        pause = self.depth_interval if interval is None else interval
        while True:
            await self.poll_once(broker)
            await asyncio.sleep(pause)

    async def poll_once(self, broker: Broker) -> None:
        """Read the depth of every queue read through an intake, and of its dead-letter queue, once."""
        for queue, dead in list(self._dead_letter_of.items()):
            for name, gauge in ((queue, self.m_depth), (dead, self.m_dead_depth)):
                try:
                    depth = await broker.depth(name)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a reply queue that is gone, a broker that is down: skip this round
                    log.debug("cannot read the depth of %r: %s: %s", name, type(exc).__name__, exc)
                    continue
                gauge.labels(queue).set(depth)

    def _collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        in_flight: dict[str, int] = {}
        for intake in list(self._intakes):
            in_flight[intake.queue] = in_flight.get(intake.queue, 0) + intake.stats.in_flight
        gauge = GaugeMetricFamily(
            "taskstream_messages_in_flight", METRICS["taskstream_messages_in_flight"][2], labels=["queue"]
        )
        for queue, value in sorted(in_flight.items()):
            gauge.add_metric([queue], value)
        yield gauge
        fields = (
            ("taskstream_stream_records_in", "items_in"),
            ("taskstream_stream_records_out", "items_out"),
            ("taskstream_stream_late_records", "late"),
            ("taskstream_stream_dead_lettered", "dead_lettered"),
        )
        totals: dict[tuple[str, str, str], list[int]] = {}
        for ctx in list(self._runtimes.values()):
            for step, stats in list(ctx.stats.items()):
                row = totals.setdefault((ctx.pipeline, ctx.stage or "", step), [0, 0, 0, 0])
                for i, (_, attr) in enumerate(fields):
                    row[i] += int(getattr(stats, attr))
        for i, (name, _) in enumerate(fields):
            family = CounterMetricFamily(name, METRICS[name + "_total"][2], labels=["pipeline", "stage", "step"])
            for labels, row in sorted(totals.items()):
                family.add_metric(list(labels), row[i])
            yield family


#: metrics read from the runtimes when scraped (not instruments of their own)
_COLLECTED = frozenset(
    {
        "taskstream_messages_in_flight",
        "taskstream_stream_records_in_total",
        "taskstream_stream_records_out_total",
        "taskstream_stream_late_records_total",
        "taskstream_stream_dead_lettered_total",
    }
)


class _Collector:
    """Reads in-flight counts and stream step counters when Prometheus scrapes."""

    def __init__(self, recorder: PrometheusRecorder) -> None:
        self._recorder = weakref.ref(recorder)

    def collect(self) -> Iterator[Metric]:
        recorder = self._recorder()
        if recorder is not None:
            yield from recorder._collect()

    def describe(self) -> list[Metric]:
        return []
