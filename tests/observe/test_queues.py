"""Which queues ``taskstream queues --app`` shows, and the figures of each on the memory broker."""

from __future__ import annotations

import pytest

from taskstream import App
from taskstream.brokers.base import Broker, QueueStats
from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import ConfigurationError
from taskstream.observe import app_queues, inspect_queues, queue_info
from taskstream.stream_ops import CallbackSink, Pipeline


def sensors() -> Pipeline:
    pipeline = Pipeline("obs-sensors")
    (pipeline.source("numbers", range(10)).stage("doubled").map(lambda n: n * 2).sink(CallbackSink(lambda value: None)))
    pipeline.stage("doubled").parallelism(2)
    return pipeline


def test_an_app_gives_its_consumer_task_and_pipeline_stage_queues() -> None:
    app = App(broker="memory://")

    @app.consumer("orders.in", publish_to="orders.out")
    def handle(order: dict[str, int]) -> dict[str, int]:
        return order

    @app.consumer("audit", dead_letter="audit.rejected")
    def audit(entry: dict[str, int]) -> None:
        return None

    @app.task(queue="reports")
    def report(n: int) -> int:
        return n

    app.add_component(sensors().component(stage="doubled"))
    assert app_queues(app) == {
        "orders.in": None,
        "audit": "audit.rejected",
        "reports": None,
        "obs-sensors-doubled-0": "obs-sensors-dead-letters",
        "obs-sensors-doubled-1": "obs-sensors-dead-letters",
    }
    assert app_queues(sensors()) == {
        "obs-sensors-doubled-0": "obs-sensors-dead-letters",
        "obs-sensors-doubled-1": "obs-sensors-dead-letters",
    }
    with pytest.raises(ConfigurationError, match="App or Pipeline, got a str"):
        app_queues("orders.in")


@pytest.mark.memory
async def test_figures_follow_the_queue() -> None:
    async with MemoryBroker() as broker:
        await broker.declare("orders")
        for n in range(3):
            await broker.publish("orders", b"{}", message_id=f"m{n}")
        info = await queue_info(broker, "orders")
        assert (info.depth, info.dead_letter, info.dead_letter_depth) == (3, "orders.dlq", None)
        assert (info.in_flight, info.consumers, info.error) == (0, 0, None)
        await broker.declare("orders.dlq")
        await broker.publish("orders.dlq", b"{}")
        async with broker.consume("orders", prefetch=2) as sub:
            held = [await sub.__anext__(), await sub.__anext__()]
            [info] = await inspect_queues(broker, {"orders": None})
            assert (info.depth, info.in_flight, info.consumers) == (1, 2, 1)
            assert (info.dead_letter_depth, info.error) == (1, None)
            assert info.as_dict()["dead_letter"] == "orders.dlq"
            await held[0].ack()
        info = await queue_info(broker, "orders")  # closing gave the unsettled one back
        assert (info.depth, info.in_flight, info.consumers) == (2, 0, 0)


@pytest.mark.memory
async def test_a_missing_queue_is_reported_not_raised() -> None:
    async with MemoryBroker() as broker:
        info = await queue_info(broker, "nowhere")
        assert (info.depth, info.in_flight, info.consumers, info.dead_letter_depth) == (None, None, None, None)
        assert info.error == "nowhere does not exist"


@pytest.mark.memory
async def test_the_default_queue_stats_is_the_depth_alone() -> None:
    async with MemoryBroker() as broker:
        await broker.declare("orders")
        await broker.publish("orders", b"{}")
        async with broker.consume("orders") as sub:
            await sub.__anext__()
            await broker.publish("orders", b"{}")
            assert await Broker.queue_stats(broker, "orders") == QueueStats(1, None, None)
            assert await broker.queue_stats("orders") == QueueStats(1, 1, 1)
