"""Queue figures on any broker: depth, dead letters, in flight and consumers (behind ``taskstream queues``).

Every figure comes from :meth:`Broker.queue_stats` (one request per queue where the broker allows it). In
flight and consumers are shown only where the broker says them (``capabilities.reports_in_flight`` /
``reports_consumers``); elsewhere they are ``None`` (shown as ``-``):

========  ===============================  ==============================  =====================
Broker    depth                            in flight                       consumers
========  ===============================  ==============================  =====================
memory    ready + delayed                  its in-flight table             open subscriptions
RabbitMQ  ready (a passive declare)        ``None`` (management API only)  the passive declare's
SQS       approximate: visible + delayed   approximate: not visible        ``None``
Azure     approximate, in flight included  ``None``                        ``None``
ZeroMQ    ready + delayed (the device)     unacked (the device)            the device's
========  ===============================  ==============================  =====================

Example:
    >>> async def example(broker, app):
    ...     for info in await inspect_queues(broker, app_queues(app)):
    ...         print(info.queue, info.depth, info.dead_letter_depth)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from taskstream.brokers.base import Broker, QueueStats
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


_UNKNOWN = QueueStats(None, None, None)


async def _stats(broker: Broker, queue: str, *, missing_ok: bool = False) -> tuple[QueueStats, str | None]:
    try:
        return await broker.queue_stats(queue), None
    except QueueNotFound:
        return _UNKNOWN, None if missing_ok else f"{queue} does not exist"
    except BrokerError as exc:
        return _UNKNOWN, f"{queue}: {exc}"


async def queue_info(broker: Broker, queue: str, *, dead_letter: str | None = None) -> QueueInfo:
    """Figures of ``queue`` and of its dead-letter queue (``broker.dead_letter_name(queue)`` by default).

    A queue that does not exist, or a figure the broker refuses, is reported in ``error``, not raised.
    """
    dlq = dead_letter or broker.dead_letter_name(queue)
    # A missing dead-letter queue is no error: nothing was dead-lettered yet (its depth shows as unknown).
    # One after the other: a refused passive declare closes RabbitMQ's admin channel under a parallel call.
    stats, error = await _stats(broker, queue)
    dlq_stats, dlq_error = await _stats(broker, dlq, missing_ok=True)
    return QueueInfo(queue, stats.depth, dlq, dlq_stats.depth, stats.in_flight, stats.consumers, error or dlq_error)


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
