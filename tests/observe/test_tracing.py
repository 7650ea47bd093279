"""Traces with the OpenTelemetry SDK's in-memory exporter: a publish_to chain (memory and RabbitMQ), a task with
two dataflow inputs (span links), and a 3-stage pipeline, each one trace."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskstream import App
from taskstream.brokers.base import broker_from_url
from taskstream.brokers.memory import MemoryBroker
from taskstream.observe.tracing import active_tracer
from taskstream.stream_ops import IterableSource, ListSink, Pipeline
from tests.support.waiting import wait_for

EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process-wide SDK provider (set once: OpenTelemetry allows one), its spans cleared per test."""
    if active_tracer() is None:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    assert active_tracer() is not None
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


async def chain(app: App, prefix: str) -> list[int]:
    seen: list[int] = []

    @app.consumer(f"{prefix}.a", publish_to=f"{prefix}.b")
    def first(n: int) -> int:
        return n + 1

    @app.consumer(f"{prefix}.b", publish_to=f"{prefix}.c")
    async def second(n: int) -> int:
        return n * 10

    @app.consumer(f"{prefix}.c")
    def last(n: int) -> None:
        seen.append(n)

    async with app:
        await app.publish(f"{prefix}.a", 1)
        await wait_for(lambda: seen, what="the end of the chain")
    return seen


def assert_one_chain_trace(found: list[ReadableSpan], prefix: str) -> None:
    order = [f"publish {prefix}.a", f"process {prefix}.a", f"publish {prefix}.b", f"process {prefix}.b"]
    order += [f"publish {prefix}.c", f"process {prefix}.c"]
    picked = []
    for name in order:
        matching = named(found, name)
        assert len(matching) == 1, (name, [s.name for s in found])
        picked.append(matching[0])
    assert len({s.context.trace_id for s in picked}) == 1  # one trace along the chain
    for parent, child in itertools.pairwise(picked):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id, child.name
    assert picked[0].kind == trace.SpanKind.PRODUCER and picked[1].kind == trace.SpanKind.CONSUMER
    attributes = picked[1].attributes or {}
    assert attributes["messaging.destination.name"] == f"{prefix}.a"
    assert attributes["messaging.operation.type"] == "process"


@pytest.mark.memory
async def test_publish_to_chain_is_one_trace(spans: InMemorySpanExporter) -> None:
    prefix = f"tr-{uuid.uuid4().hex[:6]}"
    assert await chain(App(f"memory://{prefix}"), prefix) == [20]
    assert_one_chain_trace(list(spans.get_finished_spans()), prefix)


@pytest.mark.rabbitmq
async def test_publish_to_chain_is_one_trace_on_rabbitmq(spans: InMemorySpanExporter) -> None:
    prefix = f"tr-{uuid.uuid4().hex[:6]}"
    url = "amqp://guest:guest@127.0.0.1:5672/"
    try:
        assert await chain(App(url), prefix) == [20]
        await wait_for(lambda: named(list(spans.get_finished_spans()), f"process {prefix}.c"), what="last span")
        found = list(spans.get_finished_spans())
        assert_one_chain_trace(found, prefix)
        assert (named(found, f"process {prefix}.a")[0].attributes or {})["messaging.system"] == "rabbitmq"
    finally:
        broker = broker_from_url(url)
        async with broker:
            for name in ("a", "b", "c"):
                for queue in (f"{prefix}.{name}", f"{prefix}.{name}.dlq"):
                    await broker.delete_queue(queue)


@pytest.mark.memory
async def test_a_task_links_to_its_two_dataflow_inputs(spans: InMemorySpanExporter) -> None:
    app = App(f"memory://tr-tasks-{uuid.uuid4().hex[:6]}")

    @app.task(queue="tr.tasks")
    def inc(n: int) -> int:
        return n + 1

    @app.task(queue="tr.tasks")
    def add(a: int, b: int) -> int:
        return a + b

    async with app:
        x, y = inc.submit(1), inc.submit(2)
        total = add.submit(x, y)
        assert await total == 5
    found = list(spans.get_finished_spans())
    creates = named(found, "create tr.tasks")
    assert len(creates) == 3
    dependent = next(s for s in creates if s.links)
    inputs = [s for s in creates if s is not dependent]
    assert {link.context.span_id for link in dependent.links} == {s.context.span_id for s in inputs}
    processes = named(found, "process tr.tasks")
    assert len(processes) == 3
    # each task message's process span continues the trace of its create span
    by_id = {s.context.span_id: s for s in creates}
    assert all(p.parent is not None and p.parent.span_id in by_id for p in processes)


@pytest.mark.memory
async def test_a_record_through_three_stages_is_one_trace(spans: InMemorySpanExporter) -> None:
    name = f"tr-pipe-{uuid.uuid4().hex[:6]}"
    sink = ListSink()
    p = Pipeline(name)
    (
        p.source("numbers", IterableSource(range(5)))
        .map(lambda n: n + 1)
        .stage("double")
        .map(lambda n: n * 2)
        .stage("store")
        .sink(sink)
    )
    await p.run_distributed(MemoryBroker())
    assert sorted(sink.items) == [2, 4, 6, 8, 10]
    found = list(spans.get_finished_spans())
    roots = [s for s in found if s.name == "source numbers"]
    assert roots, [s.name for s in found]
    record_roots = [r for r in roots if (r.attributes or {}).get("taskstream.batch.size")]
    trace_id = record_roots[0].context.trace_id
    in_trace = {s.name.split(" ")[0] for s in found if s.context.trace_id == trace_id}
    stage_processes = [s for s in found if s.name.startswith("process") and s.context.trace_id == trace_id]
    assert {"source", "publish", "process"} <= in_trace
    assert len({s.attributes["messaging.destination.name"] for s in stage_processes if s.attributes}) == 2
