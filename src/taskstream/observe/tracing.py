"""OpenTelemetry traces of the message path: W3C ``traceparent`` in message headers, messaging spans.

With ``opentelemetry-api`` installed and a tracer provider configured (the SDK, or any vendor's), every
publish starts a ``publish <queue>`` span (kind ``PRODUCER``) and writes its context into the message's headers
as ``traceparent`` (and ``tracestate``); every reader opens a ``process <queue>`` span (kind ``CONSUMER``) whose
parent is that context, and keeps it current while the handler runs, so what the handler publishes continues the
same trace. The attributes follow the OpenTelemetry messaging conventions (``messaging.system``,
``messaging.destination.name``, ``messaging.operation.type``/``.name``, ``messaging.message.id``,
``messaging.batch.message_count``).

=================================  ===========================================================================
What                               Trace
=================================  ===========================================================================
``@app.consumer(publish_to=...)``  process -> publish -> process ...: one trace along the chain
task submitted                     ``create <queue>`` span per task message (the task's own context); a task
                                   with futures as arguments links (span links) to its inputs' spans
stream stages                      one ``process`` span per input batch, its parent the context of the batch's
                                   first message and links to the others; the stage's outputs carry that
                                   span's context (one ``traceparent`` per published batch)
=================================  ===========================================================================

Headers travel on every broker (AMQP headers, SQS's packed attribute, Azure's frame, ZeroMQ frames, memory); a
plain producer's ``traceparent`` (an SQS String attribute, an AMQP header) is honoured too.

No tracer provider configured, or no ``opentelemetry-api``: :func:`tracing_for` returns :data:`NOOP`, whose
methods return one shared do-nothing context manager. The decision is taken when an intake or producer is built
(the provider checked once per provider object and cached), never per message.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from taskstream.brokers.base import Broker, Delivery, OutgoingMessage

__all__ = ["NOOP", "TRACEPARENT", "Tracing", "active_tracer", "tracing_for"]

TRACEPARENT = "traceparent"
_MAX_HEADER = 512  # longer trace headers are ignored (hostile input)
_SYSTEMS = {"rabbitmq": "rabbitmq", "sqs": "aws_sqs", "azure": "azure_storage_queues", "zmq": "zeromq"}
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()
_decision: tuple[Any, Tracer | None] | None = None


def active_tracer() -> Tracer | None:
    """taskstream's tracer when a real tracer provider is configured, else ``None`` (cached per provider)."""
    global _decision
    try:
        from opentelemetry import trace
    except ModuleNotFoundError:
        return None
    provider = trace.get_tracer_provider()
    if _decision is not None and _decision[0] is provider:
        return _decision[1]
    tracer: Tracer | None = None
    if not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        from taskstream import __version__

        tracer = provider.get_tracer("taskstream", __version__)
    _decision = (provider, tracer)
    return tracer


class Tracing:
    """Tracing off: each method returns a shared context manager that does nothing."""

    enabled = False

    def process(self, queue: str, delivery: Delivery) -> contextlib.AbstractContextManager[Any]:
        """The ``process`` span of one delivery, current while the context is entered."""
        return _NULL

    def process_batch(self, queue: str, deliveries: Sequence[Delivery]) -> contextlib.AbstractContextManager[Any]:
        """One ``process`` span for a batch: parent the first delivery's context, links to the others."""
        return _NULL

    def source_batch(self, pipeline: str, step: str, count: int) -> contextlib.AbstractContextManager[Any]:
        """The root span of a batch read from a stream source (a new trace per batch)."""
        return _NULL

    def publish(
        self, queue: str, headers: dict[str, Any], message_id: str | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """A ``publish`` span around one publish; writes its context into ``headers`` (a dict of its own)."""
        return _NULL

    def publish_batch(
        self, queue: str, messages: list[OutgoingMessage]
    ) -> contextlib.AbstractContextManager[list[OutgoingMessage]]:
        """A ``publish`` span around a batch; yields the messages, those without a context given the span's."""
        return contextlib.nullcontext(messages)

    def created(self, queue: str, headers: dict[str, Any], futures: Iterable[Any], calls: Any) -> None:
        """A task message was made: a ``create`` span linked to the spans of the futures in ``calls``."""


NOOP = Tracing()
"""Tracing of every component built while no tracer provider is configured."""


def tracing_for(broker: Broker) -> Tracing:
    """The tracing of a component on ``broker``: :data:`NOOP` unless a tracer provider is configured."""
    tracer = active_tracer()
    if tracer is None:
        return NOOP
    name = broker.capabilities.name
    return _OtelTracing(tracer, _SYSTEMS.get(name, name))


def _getter() -> Any:
    from opentelemetry.propagators.textmap import Getter

    class _HeaderGetter(Getter[Any]):
        """Reads trace headers from broker headers, ignoring anything that is not a short string."""

        def get(self, carrier: Any, key: str) -> list[str] | None:
            value = carrier.get(key) if isinstance(carrier, dict) else None
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(value, str) and len(value) <= _MAX_HEADER:
                return [value]
            return None

        def keys(self, carrier: Any) -> list[str]:
            return [k for k in carrier if isinstance(k, str)] if isinstance(carrier, dict) else []

    return _HeaderGetter()


class _OtelTracing(Tracing):
    enabled = True

    def __init__(self, tracer: Tracer, system: str) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._system = system
        self._propagator = TraceContextTextMapPropagator()
        self._getter = _getter()
        self._task_contexts: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def _attributes(self, queue: str, operation: str, kind: str, **extra: Any) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.destination.name": queue,
            "messaging.operation.type": kind,
            "messaging.operation.name": operation,
        }
        attributes.update({k: v for k, v in extra.items() if v is not None})
        return attributes

    def _extract(self, delivery: Delivery) -> Any:
        return self._propagator.extract(delivery.headers, getter=self._getter)

    def process(self, queue: str, delivery: Delivery) -> contextlib.AbstractContextManager[Any]:
        from opentelemetry.trace import SpanKind

        attributes = self._attributes(queue, "process", "process")
        attributes["messaging.message.id"] = delivery.message_id or ""
        attributes["messaging.message.delivery_attempt"] = delivery.attempt
        return self._tracer.start_as_current_span(
            f"process {queue}", context=self._extract(delivery), kind=SpanKind.CONSUMER, attributes=attributes
        )

    def process_batch(self, queue: str, deliveries: Sequence[Delivery]) -> contextlib.AbstractContextManager[Any]:
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind

        parent: Any = None
        links: list[Link] = []
        seen: set[int] = set()
        for delivery in deliveries:
            if TRACEPARENT not in delivery.headers:
                continue
            context = self._extract(delivery)
            span_context = trace.get_current_span(context).get_span_context()
            if not span_context.is_valid or span_context.span_id in seen:
                continue
            seen.add(span_context.span_id)
            if parent is None:
                parent = context
            else:
                links.append(Link(span_context))
        attributes = self._attributes(queue, "process", "process", **{"messaging.batch.message_count": len(deliveries)})
        return self._tracer.start_as_current_span(
            f"process {queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )

    def source_batch(self, pipeline: str, step: str, count: int) -> contextlib.AbstractContextManager[Any]:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            "taskstream.pipeline": pipeline,
            "taskstream.step": step,
            "taskstream.batch.size": count,
        }
        return self._tracer.start_as_current_span(
            f"source {step}", context=Context(), kind=SpanKind.INTERNAL, attributes=attributes
        )

    @contextlib.contextmanager
    def publish(self, queue: str, headers: dict[str, Any], message_id: str | None = None) -> Iterator[None]:
        from opentelemetry.trace import SpanKind

        attributes = self._attributes(queue, "publish", "send", **{"messaging.message.id": message_id})
        with self._tracer.start_as_current_span(f"publish {queue}", kind=SpanKind.PRODUCER, attributes=attributes):
            self._propagator.inject(headers)
            yield

    @contextlib.contextmanager
    def publish_batch(self, queue: str, messages: list[OutgoingMessage]) -> Iterator[list[OutgoingMessage]]:
        from opentelemetry.trace import SpanKind

        extra: dict[str, Any] = {"messaging.batch.message_count": len(messages)} if len(messages) > 1 else {}
        if len(messages) == 1:
            extra["messaging.message.id"] = messages[0].message_id
        attributes = self._attributes(queue, "publish", "send", **extra)
        with self._tracer.start_as_current_span(f"publish {queue}", kind=SpanKind.PRODUCER, attributes=attributes):
            carrier: dict[str, Any] = {}
            self._propagator.inject(carrier)
            yield [m if TRACEPARENT in m.headers else replace(m, headers={**m.headers, **carrier}) for m in messages]

    def created(self, queue: str, headers: dict[str, Any], futures: Iterable[Any], calls: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind

        from taskstream.tasks.dataflow import find_futures

        links = []
        for future in find_futures(calls):
            span_context = self._task_contexts.get(future)
            if span_context is not None:
                links.append(Link(span_context, {"taskstream.link": "dataflow input"}))
        attributes = self._attributes(queue, "create", "create")
        span = self._tracer.start_span(f"create {queue}", kind=SpanKind.PRODUCER, attributes=attributes, links=links)
        try:
            self._propagator.inject(headers, context=trace.set_span_in_context(span))
            for future in futures:
                self._task_contexts[future] = span.get_span_context()
        finally:
            span.end()
