"""Queue figures on any broker: depth, dead letters, in flight and consumers (behind ``taskstream queues``).

``depth`` and the dead-letter depth come from :meth:`Broker.depth` on every backend. In flight and consumers
are shown only where the broker says them: the ZeroMQ device reports unacked messages and consumers per queue
(``device_stats``), and any backend that grows an ``async queue_stats(queue) -> Mapping`` with ``in_flight``
and ``consumers`` is read the same way; elsewhere they are ``None`` (shown as ``-``).

What a broker counts as depth differs: RabbitMQ, SQS, memory and ZeroMQ count ready (and delayed) messages;
Azure's ``approximate_message_count`` includes invisible (in-flight) ones.

Example:
    >>> async def example(broker, app):
    ...     for info in await inspect_queues(broker, app_queues(app)):
    ...         print(info.queue, info.depth, info.dead_letter_depth)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from taskstream.brokers.base import Broker
from taskstream.errors import BrokerError, ConfigurationError, QueueNotFound

__all__ = ["QueueInfo", "app_queues", "inspect_queues", "queue_info"]


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """Figures of one queue. ``None`` means the broker does not say (or the queue does not exist).

    Attributes:
        queue: the queue's name.
        depth: messages waiting (see the module docstring for what each broker counts).
        dead_letter: its dead-letter queue.
        dead_letter_depth: messages in the dead-letter queue.
        in_flight: messages handed to consumers and not yet settled.
        consumers: consumers attached.
        error: why a figure is missing (``"queue does not exist"``, a broker error), or ``None``.
    """

    queue: str
    depth: int | None
    dead_letter: str
    dead_letter_depth: int | None
    in_flight: int | None = None
    consumers: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return asdict(self)


async def _depth(broker: Broker, queue: str, *, missing_ok: bool = False) -> tuple[int | None, str | None]:
    try:
        return await broker.depth(queue), None
    except QueueNotFound:
        return None, None if missing_ok else f"{queue} does not exist"
    except BrokerError as exc:
        return None, f"{queue}: {exc}"


async def _live_figures(broker: Broker, queue: str) -> tuple[int | None, int | None]:
    """(in flight, consumers) where the broker reports them."""
    queue_stats = getattr(broker, "queue_stats", None)
    if callable(queue_stats):
        stats = await queue_stats(queue)
        if isinstance(stats, Mapping):
            return _int_or_none(stats.get("in_flight")), _int_or_none(stats.get("consumers"))
    device_stats = getattr(broker, "device_stats", None)
    if callable(device_stats):
        snapshot = await device_stats()
        queues = snapshot.get("queues", {}) if isinstance(snapshot, Mapping) else {}
        figures = queues.get(queue)
        if isinstance(figures, Mapping):
            return _int_or_none(figures.get("unacked")), _int_or_none(figures.get("consumers"))
    return None, None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def queue_info(broker: Broker, queue: str, *, dead_letter: str | None = None) -> QueueInfo:
    """Figures of ``queue`` and of its dead-letter queue (``broker.dead_letter_name(queue)`` by default).

    A queue that does not exist, or a figure the broker refuses, is reported in ``error``, not raised.
    """
    dlq = dead_letter or broker.dead_letter_name(queue)
    # A missing dead-letter queue is no error: nothing was dead-lettered yet (its depth shows as unknown).
    # One after the other: a refused passive declare closes RabbitMQ's admin channel under a parallel call.
    depth, error = await _depth(broker, queue)
    dlq_depth, dlq_error = await _depth(broker, dlq, missing_ok=True)
    in_flight = consumers = None
    if error is None:
        try:
            in_flight, consumers = await _live_figures(broker, queue)
        except BrokerError as exc:
            error = f"{queue}: in flight unknown: {exc}"
    return QueueInfo(queue, depth, dlq, dlq_depth, in_flight, consumers, error or dlq_error)


async def inspect_queues(broker: Broker, queues: Mapping[str, str | None] | Iterable[str]) -> list[QueueInfo]:
    """:func:`queue_info` of each queue, in order; ``queues`` may map a queue to its dead-letter queue."""
    pairs = list(queues.items()) if isinstance(queues, Mapping) else [(q, None) for q in queues]
    return [await queue_info(broker, queue, dead_letter=dlq) for queue, dlq in pairs]


def app_queues(target: Any) -> dict[str, str | None]:
    """The queues an App (or a Pipeline) consumes, each with its dead-letter queue when it is not the default.

    An App gives its ``@app.consumer`` queues, its task queues and the stage queues of the pipelines added
    to it as components; a Pipeline gives its stage queues (their dead letters go to the pipeline's one
    dead-letter queue).

    Raises:
        ConfigurationError: ``target`` is neither an App nor a Pipeline.
    """
    from taskstream.app import App
    from taskstream.stream_ops.pipeline import Pipeline

    if isinstance(target, Pipeline):
        return _pipeline_queues(target)
    if not isinstance(target, App):
        raise ConfigurationError(f"expected a taskstream App or Pipeline, got a {type(target).__name__}")
    found: dict[str, str | None] = {}
    for spec in target.specs:
        found.setdefault(spec.queue, spec.config.dead_letter)
    for queue in target.tasks.task_queues():
        found.setdefault(queue, None)
    for component in target.components:
        pipeline = getattr(component, "pipeline", None)
        if isinstance(pipeline, Pipeline):
            for queue, dlq in _pipeline_queues(pipeline).items():
                found.setdefault(queue, dlq)
    return found


def _pipeline_queues(pipeline: Any) -> dict[str, str | None]:
    plan = pipeline.plan()
    return {
        queue: plan.dead_letter_queue
        for stage in plan.stages.values()
        if stage.consumes_queue
        for queue in stage.queues
    }
