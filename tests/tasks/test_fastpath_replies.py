"""The task round trip's fast path (issue 15): transient reply queues on RabbitMQ, and the store written while
the reply travels.

* A reply queue is not durable, so a broker restart drops it with its replies; the client then reads the
  outcomes of the tasks it waits for from the result store after it reconnects. The restart is played by a
  TcpProxy in front of the client (its connection is down) while the reply queue is deleted: the worker's
  replies find no queue, only the store has the outcomes.
* A reply may reach the client before the worker's store record: ``get_task`` answers from the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiormq
import pytest

from taskstream.app import App
from taskstream.brokers.rabbitmq import RabbitMQBroker
from taskstream.brokers.rabbitmq.topology import DLX_EXCHANGE
from taskstream.tasks.stores.base import TaskInfo
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.names import unique
from tests.support.proxy import TcpProxy
from tests.support.queues import delete_queues
from tests.support.waiting import wait_for
from tests.tasks import library
from tests.tasks.conftest import quick_settings

GATES: list[asyncio.Event] = []  # the current test's gate (an Event belongs to one test's loop)


async def gated(i: int) -> int:
    await GATES[-1].wait()
    return i * 10


def _new_gate() -> asyncio.Event:
    GATES[:] = [asyncio.Event()]
    return GATES[-1]


@dataclass
class Proxied:
    """A worker App and a client App sharing one store; the client reaches RabbitMQ through ``proxy``."""

    proxy: TcpProxy
    worker: App
    client: App
    task: Any


@asynccontextmanager
async def proxied_apps(tmp_path: Path, queue: str) -> AsyncIterator[Proxied]:
    store = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    port = urlsplit(URL).port or 5672
    proxy = TcpProxy(port)
    await proxy.up()
    client_broker = RabbitMQBroker.from_url(
        URL.replace(f":{port}", f":{proxy.port}", 1), reconnect_interval=0.2, reconnect_timeout=60
    )
    worker = App(broker=RabbitMQBroker.from_url(URL), settings=quick_settings(), result_store=store, workers=True)
    client = App(broker=client_broker, settings=quick_settings(), result_store=store, workers=False)
    worker.task(queue=queue)(gated)
    task = client.task(queue=queue)(gated)
    try:
        async with worker, client:
            yield Proxied(proxy, worker, client, task)
    finally:
        GATES[-1].set()
        await proxy.stop()
        await delete_queues(URL, queue)


@pytest.mark.rabbitmq
async def test_outcomes_of_replies_lost_with_the_reply_queue_come_from_the_store(tmp_path: Path) -> None:
    gate = _new_gate()
    queue = unique("fastpath")
    async with proxied_apps(tmp_path, queue) as apps:
        proxy, worker, client, task = apps.proxy, apps.worker, apps.client, apps.task
        futures = [task.submit(i) for i in range(3)]
        await wait_for(
            lambda: all(client.get_task(f.task_id).status == "running" for f in futures),
            what="the three tasks running on the worker",
        )
        reply_queue = client.tasks.client.reply_queue
        # the reply queue is transient: declaring it again not durable, with its arguments, is accepted
        # (RabbitMQ refuses a declaration whose durability differs from the queue's)
        arguments = {"x-dead-letter-exchange": DLX_EXCHANGE, "x-dead-letter-routing-key": reply_queue}
        connection = await aiormq.connect(URL)
        try:
            channel = await connection.channel()
            await channel.queue_declare(reply_queue, durable=False, arguments=arguments)
        finally:
            await connection.close()

        await proxy.down()  # the client is cut off, and its reply queue is gone as with a broker restart
        async with RabbitMQBroker.from_url(URL) as admin:
            await admin.delete_queue(reply_queue)
        gate.set()
        await wait_for(
            lambda: all(_stored(worker, f.task_id).status == "success" for f in futures),
            what="the worker's records of the three outcomes",
        )
        assert not any(f.done() for f in futures)  # their replies had nowhere to go
        await proxy.up()
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert results == [0, 10, 20]


def _stored(app: App, task_id: str) -> TaskInfo:
    info = app.tasks.store.get(task_id)
    assert info is not None
    return info


@pytest.mark.rabbitmq
async def test_a_connection_cut_while_tasks_run_leaves_no_future_waiting(tmp_path: Path) -> None:
    gate = _new_gate()
    queue = unique("fastpath-cut")
    async with proxied_apps(tmp_path, queue) as apps:
        proxy, client, task = apps.proxy, apps.client, apps.task
        futures = [task.submit(i) for i in range(5)]
        await wait_for(
            lambda: all(client.get_task(f.task_id).status == "running" for f in futures),
            what="the five tasks running",
        )
        proxy.cut()
        gate.set()  # replies go to the (surviving) reply queue while the client reconnects
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert results == [0, 10, 20, 30, 40]
        assert proxy.cuts == 1


async def test_get_task_answers_from_the_reply_before_the_store_has_the_outcome(tmp_path: Path) -> None:
    app = App("memory://", settings=quick_settings(), result_store=f"sqlite:///{tmp_path / 'r.sqlite3'}")
    add = app.task(queue=unique("fastpath-mem"))(library.async_add)
    async with app:
        store = app.tasks.store
        finish = store.finish
        release = asyncio.Event()

        async def late_finish(info: TaskInfo) -> None:  # the worker's record is written after its reply
            await release.wait()
            await finish(info)

        store.finish = late_finish  # type: ignore[method-assign]
        try:
            future = add.submit(2, 3)
            assert await asyncio.wait_for(asyncio.wrap_future(future), 30) == 5
            stored = store.get(future.task_id)
            assert stored is not None and stored.status == "running"  # the record is behind the reply
            info = app.get_task(future.task_id)
            assert info.status == "success" and info.result == 5
        finally:
            release.set()
        await wait_for(lambda: (i := store.get(future.task_id)) is not None and i.status == "success", what="record")
        assert app.get_task(future.task_id).result == 5
