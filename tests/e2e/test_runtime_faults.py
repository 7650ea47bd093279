"""The shared runtime when things around it fail: a start that fails half-way, an ack the broker refuses."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from taskstream import App
from taskstream.brokers.base import broker_from_url
from taskstream.consumer import Consumer, Message
from taskstream.errors import BrokerConnectionError, ConfigurationError
from taskstream.settings import redact_url
from tests.e2e.conftest import URLS
from tests.support.waiting import wait_for


@pytest.mark.memory
async def test_a_failed_start_leaves_nothing_running() -> None:
    hub = f"memory://e2e-{uuid.uuid4().hex[:8]}"
    app = App(hub)
    handled: list[Any] = []

    @app.consumer("first")
    async def first(body: Any) -> None:
        handled.append(body)

    @app.consumer("second", prefetch=-1)  # refused when its consumer starts, after "first" is running
    async def second(body: Any) -> None:
        handled.append(body)

    with pytest.raises(ConfigurationError, match="prefetch"):
        await app.start()
    assert app.consumers == []
    with pytest.raises(BrokerConnectionError):  # the app's connection was closed
        await app.broker.publish("first", b"{}")
    async with broker_from_url(hub) as other:
        await other.publish("first", b'{"n": 1}')
        await asyncio.sleep(0.3)  # a consumer left running would take it at once
        assert await other.depth("first") == 1
    assert handled == []


@pytest.mark.azure
async def test_an_ack_the_broker_refuses_is_reported_not_raised(queues: Callable[[str, str], str]) -> None:
    url = URLS["azure"]
    queue = queues(url, "ack-refused")
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    started, release = asyncio.Event(), asyncio.Event()

    async def handle(message: Message) -> None:
        started.set()
        await release.wait()

    broker = broker_from_url(url)
    try:
        async with broker:
            consumer = Consumer(broker, queue, handle)
            await consumer.start()
            await broker.publish(queue, b'{"n": 1}')
            async with asyncio.timeout(30):
                await started.wait()
            await broker.delete_queue(queue)  # gone while its message is being handled: the ack must fail
            release.set()
            await wait_for(lambda: consumer.stats.in_flight == 0, timeout=30, what="the handler to finish")
            await consumer.stop(grace=0)
            gc.collect()  # an exception left in a finished task is reported when the task is collected
    finally:
        loop.set_exception_handler(previous)
    assert consumer.stats.acked == 0
    assert consumer.stats.ack_failed == 1  # reported (last_error may since name the deleted queue's receives)
    assert unhandled == []


@pytest.mark.memory
def test_redacted_urls_keep_absolute_sqlite_paths() -> None:
    assert redact_url("sqlite:////var/lib/app/results.db") == "sqlite:////var/lib/app/results.db"
    assert redact_url("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
