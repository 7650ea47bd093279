"""Prometheus metrics of the message path, recorded in one place: the intake and the producer.

Every reader (consumers, task workers, stream stage replicas, ``QueueSource``, services, reply listeners) reads
through :class:`~taskstream.intake.Intake` and every publisher goes through
:class:`~taskstream.producer.Producer`; both look up the :class:`Recorder` attached to their broker once, when
they are built. A broker with no recorder gets :data:`NOOP`, whose methods do nothing: no allocation and no lock
per message when metrics are off, and ``prometheus-client`` is not even imported. When metrics are on, a message
costs a few ``int`` additions and a bisection into a list of bucket counts; ``prometheus-client`` sees the counts
only when it is scraped (a collector), as counters and histograms of the same names, labels and buckets.

Counters of stream steps and the in-flight gauge are read from the runtimes' own counters when Prometheus
scrapes (a collector), so they cost nothing per record. Queue and dead-letter depths are polled in the
background by :meth:`Recorder.poll_depths` (the App runs it; so does ``taskstream pipeline run``).

The names, types and labels are listed in ``docs/observability.md`` (one table) and in :data:`METRICS`.

Example:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> recorder = PrometheusRecorder(CollectorRegistry())
    >>> recorder.published("orders", 2, recorder.timer())
    >>> b'taskstream_messages_published_total{queue="orders"} 2.0' in generate_latest(recorder.registry)
    True
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
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


# Threads: every recording method below is called on the event loop's thread (intake.py, consumer.py,
# producer.py, tasks/worker.py and stream_ops/runner.py call them from coroutines running on the loop), so the
# counts are plain ints, lists and dicts updated without a lock. The one exception is ``tasks_submitted``:
# tasks/client.py's ``submit_calls`` runs on whatever thread calls ``Task.submit``, so that count is kept by
# (task, thread): each thread adds only to its own entries (no update lost, no lock), and a scrape adds them up.
# A scrape only reads (copies) them, on the loop (the health server) or on another thread.


class _Histogram:
    """Bucket counts and a sum, kept with plain arithmetic (on the loop's thread, see above).

    ``counts[i]`` counts the observations ``<= bounds[i]`` and ``> bounds[i - 1]`` (the last bound is ``+Inf``),
    found by bisection; the scrape adds them up into Prometheus's cumulative buckets.
    """

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class _Counts:
    """Plain counts by label values, each with the time its series appeared (its ``_created`` sample)."""

    __slots__ = ("counts", "created")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], amount: int = 1) -> None:
        try:
            self.counts[labels] += amount
        except KeyError:
            self.created[labels] = time.time()
            self.counts[labels] = amount

    def rows(self) -> dict[tuple[str, ...], tuple[int, float]]:
        created = self.created
        return {labels: (count, created[labels]) for labels, count in list(self.counts.items())}


class _Histograms:
    """Histograms by label values, made when a label set is first observed."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[tuple[str, ...], _Histogram] = {}

    def get(self, labels: tuple[str, ...]) -> _Histogram:
        histogram = self.series.get(labels)
        if histogram is None:
            histogram = self.series[labels] = _Histogram(self.bounds)
        return histogram


def _not_negative(what: str, count: int) -> None:
    if count < 0:
        raise ValueError(f"{what} must be a count of zero or more, not {count!r}")


class _LiveQueue(QueueMetrics):
    __slots__ = ("created", "dead", "duration", "handled_count", "queue", "received_count", "retried_count")

    def __init__(self, queue: str, bounds: tuple[float, ...]) -> None:
        self.queue = queue
        self.received_count = 0
        self.handled_count = 0
        self.retried_count = 0
        self.duration = _Histogram(bounds)
        self.created = self.duration.created
        self.dead = _Counts()  # by reason class

    def timer(self) -> float:
        return time.perf_counter()

    def received(self) -> None:
        self.received_count += 1

    def handled(self, count: int = 1) -> None:
        if count < 0:
            _not_negative("handled()", count)
        self.handled_count += count

    def handler_time(self, started: float) -> None:
        seconds = time.perf_counter() - started
        duration = self.duration  # _Histogram.observe, inlined: this runs once per message
        duration.counts[bisect_left(duration.bounds, seconds)] += 1
        duration.total += seconds

    def retried(self) -> None:
        self.retried_count += 1

    def dead_lettered(self, reason: str) -> None:
        self.dead.add((reason_class(reason),))


class _Publisher:
    """What was published to one queue: messages accepted and the time of each publish call."""

    __slots__ = ("count", "created", "duration")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.count = 0
        self.duration = _Histogram(bounds)
        self.created = self.duration.created


class PrometheusRecorder(Recorder):
    """Records with plain Python arithmetic and exports into a ``prometheus_client`` registry when scraped.

    Per message, a count is an ``int`` addition and a duration a bisection into a list of bucket counts: no lock
    and no ``prometheus_client`` call. A collector turns them into the catalogue's counter and histogram families
    (same names, labels, buckets and help texts as ``prometheus_client``'s own instruments would show) at
    scrape time. Queue depths, polled every few seconds, are ``prometheus_client`` gauges.

    Args:
        registry: where the metrics are registered (one recorder per registry).
        depth_interval: seconds between two polls of queue depths.
    """

    enabled = True

    def __init__(self, registry: CollectorRegistry, *, depth_interval: float = DEFAULT_DEPTH_INTERVAL) -> None:
        from prometheus_client import Gauge, Histogram
        from prometheus_client.utils import floatToGoString

        self.registry = registry
        self.depth_interval = depth_interval
        bounds = tuple(float(b) for b in Histogram.DEFAULT_BUCKETS)
        self._bounds = bounds
        le: Callable[[float], str] = floatToGoString  # the ``le`` label as prometheus_client writes it
        self._les = tuple(le(b) for b in bounds)
        depth, dead_depth = "taskstream_queue_depth", "taskstream_dead_letter_depth"
        # registered first: a second recorder on the same registry fails here, before its collector is added
        self.m_depth = Gauge(depth, METRICS[depth][2], METRICS[depth][1], registry=registry)
        self.m_dead_depth = Gauge(dead_depth, METRICS[dead_depth][2], METRICS[dead_depth][1], registry=registry)
        self._queues: dict[str, _LiveQueue] = {}
        self._publishers: dict[str, _Publisher] = {}
        self._publish_errors = _Counts()
        self._submitted = _Counts()  # by (task, thread ident), see the note on threads above
        self._finished = _Counts()
        self._run = _Histograms(bounds)
        self._snapshot_time = _Histograms(bounds)
        self._snapshot_rows = _Histograms(bounds)
        self._dead_letter_of: dict[str, str] = {}  # queue -> its dead-letter queue (polled)
        self._intakes: weakref.WeakSet[Intake] = weakref.WeakSet()
        self._runtimes: weakref.WeakValueDictionary[int, RuntimeContext] = weakref.WeakValueDictionary()
        registry.register(_Collector(self))

    def timer(self) -> float:
        return time.perf_counter()

    def for_intake(self, intake: Intake) -> QueueMetrics:
        queue = intake.queue
        self._intakes.add(intake)
        self._dead_letter_of[queue] = intake.dead_letter_queue
        live = self._queues.get(queue)
        if live is None:
            live = self._queues[queue] = _LiveQueue(queue, self._bounds)
        return live

    def published(self, queue: str, count: int, started: float) -> None:
        if count < 0:
            _not_negative("published()", count)
        publisher = self._publishers.get(queue)
        if publisher is None:
            publisher = self._publishers[queue] = _Publisher(self._bounds)
        publisher.count += count
        seconds = time.perf_counter() - started
        duration = publisher.duration  # _Histogram.observe, inlined: this runs once per publish call
        duration.counts[bisect_left(duration.bounds, seconds)] += 1
        duration.total += seconds

    def publish_failed(self, queue: str) -> None:
        self._publish_errors.add((queue,))

    def tasks_submitted(self, task: str, count: int = 1) -> None:
        if count < 0:
            _not_negative("tasks_submitted()", count)
        self._submitted.add((task, str(threading.get_ident())), count)  # Task.submit may run on any thread

    def task_finished(self, task: str, status: str, seconds: float | None) -> None:
        self._finished.add((task, status))
        if seconds is not None:
            self._run.get((task,)).observe(seconds if seconds > 0.0 else 0.0)

    def watch_runtime(self, ctx: RuntimeContext) -> None:
        self._runtimes[id(ctx)] = ctx  # contexts are dataclasses: compared by value, so kept by identity

    def snapshot(self, pipeline: str, stage: str | None, started: float, rows: int) -> None:
        labels = (pipeline, stage or "")
        self._snapshot_time.get(labels).observe(time.perf_counter() - started)
        self._snapshot_rows.get(labels).observe(rows)

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
        yield self._in_flight()
        yield from self._recorded()
        yield from self._stream_steps()

    def _in_flight(self) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        in_flight: dict[str, int] = {}
        for intake in list(self._intakes):
            in_flight[intake.queue] = in_flight.get(intake.queue, 0) + intake.stats.in_flight
        gauge = GaugeMetricFamily(
            "taskstream_messages_in_flight", METRICS["taskstream_messages_in_flight"][2], labels=["queue"]
        )
        for queue, value in sorted(in_flight.items()):
            gauge.add_metric([queue], value)
        return gauge

    def _recorded(self) -> Iterator[Metric]:
        """The counters and histograms kept in plain Python, as metric families."""
        created = _created_series()
        les = self._les
        queues = list(self._queues.values())
        for name, attr in (
            ("taskstream_messages_received_total", "received_count"),
            ("taskstream_messages_handled_total", "handled_count"),
            ("taskstream_messages_retried_total", "retried_count"),
        ):
            yield _counter(name, {(q.queue,): (getattr(q, attr), q.created) for q in queues}, created)
        dead = {(q.queue, *labels): row for q in queues for labels, row in q.dead.rows().items()}
        yield _counter("taskstream_messages_dead_lettered_total", dead, created)
        durations: dict[tuple[str, ...], _Histogram] = {(q.queue,): q.duration for q in queues}
        yield _histogram("taskstream_handler_duration_seconds", durations, les, created)
        publishers = list(self._publishers.items())
        published: dict[tuple[str, ...], tuple[int, float]] = {(q,): (p.count, p.created) for q, p in publishers}
        yield _counter("taskstream_messages_published_total", published, created)
        yield _counter("taskstream_publish_errors_total", self._publish_errors.rows(), created)
        publish_times: dict[tuple[str, ...], _Histogram] = {(queue,): p.duration for queue, p in publishers}
        yield _histogram("taskstream_publish_duration_seconds", publish_times, les, created)
        yield _counter("taskstream_tasks_submitted_total", _by_task(self._submitted.rows()), created)
        yield _counter("taskstream_tasks_finished_total", self._finished.rows(), created)
        yield _histogram("taskstream_task_run_seconds", dict(self._run.series), les, created)
        yield _histogram("taskstream_stream_snapshot_seconds", dict(self._snapshot_time.series), les, created)
        yield _histogram("taskstream_stream_snapshot_rows", dict(self._snapshot_rows.series), les, created)

    def _stream_steps(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

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


def _created_series() -> bool:
    """Whether ``_created`` samples are exported: the switch ``prometheus_client``'s own instruments follow
    (``PROMETHEUS_DISABLE_CREATED_SERIES``, ``disable_created_metrics()``)."""
    from prometheus_client import metrics

    return bool(getattr(metrics, "_use_created", True))


def _by_task(rows: dict[tuple[str, ...], tuple[int, float]]) -> dict[tuple[str, ...], tuple[int, float]]:
    """``(task, thread) -> (count, created)`` added up into ``(task,) -> (count, first created)``."""
    out: dict[tuple[str, ...], tuple[int, float]] = {}
    for (task, _), (count, since) in rows.items():
        before = out.get((task,))
        out[(task,)] = (count, since) if before is None else (before[0] + count, min(before[1], since))
    return out


def _counter(name: str, rows: dict[tuple[str, ...], tuple[int, float]], created: bool) -> Metric:
    """A counter family of the catalogue from ``labels -> (count, created at)``."""
    from prometheus_client.core import CounterMetricFamily

    _, labels, doc = METRICS[name]
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for values, (count, since) in rows.items():
        family.add_metric(list(values), count, created=since if created else None)
    return family


def _histogram(name: str, series: dict[tuple[str, ...], _Histogram], les: tuple[str, ...], created: bool) -> Metric:
    """A histogram family of the catalogue: cumulative buckets, count, sum (and ``_created``) per label set."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.samples import Sample

    _, labels, doc = METRICS[name]
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, histogram in series.items():
        counts, total = list(histogram.counts), histogram.total
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(les, counts, strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        family.add_metric(list(values), buckets, total)
        if created:
            family.samples.append(Sample(f"{name}_created", dict(zip(labels, values, strict=True)), histogram.created))
    return family


class _Collector:
    """Exports the recorder's plain counts, in-flight counts and stream step counters when Prometheus scrapes."""

    def __init__(self, recorder: PrometheusRecorder) -> None:
        self._recorder = weakref.ref(recorder)

    def collect(self) -> Iterator[Metric]:
        recorder = self._recorder()
        if recorder is not None:
            yield from recorder._collect()

    def describe(self) -> list[Metric]:
        return []
