"""Servers restarted while a ``taskstream run`` worker consumes and a producer publishes.

The worker must carry on by itself (RabbitMQ: robust reconnect; SQS and Azure: polling recovers) and process
every message the producer was told was published; a publish during the outage waits for the server (bounded
by the broker's timeout) or fails with a clear error, never silently.

Only private servers are restarted (:mod:`tests.support.servers`); the shared ones on the default ports are
never touched. Where a private server cannot run on this machine the test skips and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from taskstream.brokers.base import broker_from_url
from taskstream.errors import BrokerConnectionError, PublishError
from taskstream.messages import Envelope
from taskstream.producer import Producer
from tests.e2e.conftest import SQS_ENDPOINT, SQS_PREFIX, Served, unique
from tests.support.proxy import TcpProxy
from tests.support.require import unavailable
from tests.support.servers import PrivateAzurite, PrivateRabbitMQ, Unavailable
from tests.support.waiting import wait_for

BEFORE = 80  # confirmed publishes before the server goes down
AFTER = 80  # confirmed publishes after it is back


@dataclass
class Traffic:
    """What the producer saw."""

    confirmed: list[int] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    #: outcome of each publish started while the server was gone: None when it went through in the end
    during: list[BaseException | None] = field(default_factory=list)


#: an outage gets ``send_during_outage``: it starts one publish while the server is gone and returns its task
SendDuringOutage = Callable[[], asyncio.Task[None]]
Outage = Callable[[SendDuringOutage], Awaitable[None]]


async def publish_through(url: str, queue: str, worker: Served, outages: list[Outage]) -> Traffic:
    """Publish ``{"n": i}`` one after the other while each of ``outages`` runs in turn (once ``worker`` works).

    An outage calls the function it is given once the server is really gone: that starts one more publish,
    which must wait for the server or fail with a clear error (the function returns that publish's task).
    """
    traffic = Traffic()
    numbers = itertools.count()
    in_outage: list[asyncio.Task[None]] = []
    async with broker_from_url(url) as broker:
        dead_letters = broker.dead_letter_name(queue)
        await broker.declare(dead_letters)
        await broker.declare(queue, dead_letter=dead_letters)
        producer = Producer(broker)
        target = BEFORE
        stop = asyncio.Event()

        async def send(n: int) -> None:
            try:
                await producer.send(queue, Envelope(body={"n": n}))
            except (PublishError, BrokerConnectionError) as exc:  # the clear errors a caller may get
                traffic.failures.append(exc)
                raise
            traffic.confirmed.append(n)

        def send_during_outage() -> asyncio.Task[None]:
            task = asyncio.create_task(send(next(numbers)))
            in_outage.append(task)
            return task

        async def produce() -> None:
            while not stop.is_set():
                with contextlib.suppress(PublishError, BrokerConnectionError):
                    await send(next(numbers))
                await asyncio.sleep(0.005)

        producing = asyncio.create_task(produce())
        try:
            await wait_for(lambda: bool(worker.seen()), timeout=60, what="the worker to process its first message")
            for outage in outages:
                await wait_for(
                    lambda t=target: len(traffic.confirmed) >= t, timeout=120, what=f"{target} confirmed publishes"
                )
                await outage(send_during_outage)
                target = len(traffic.confirmed) + AFTER
            await wait_for(lambda: len(traffic.confirmed) >= target, timeout=120, what=f"{target} confirmed publishes")
        finally:
            stop.set()
            await producing
            outcomes = await asyncio.gather(*in_outage, return_exceptions=True)
    traffic.during = [o if isinstance(o, BaseException) else None for o in outcomes]
    assert len(traffic.during) == len(outages)
    return traffic


async def check_worker_got_everything(worker: Served, traffic: Traffic) -> None:
    await wait_for(
        lambda: set(traffic.confirmed) <= set(worker.seen()) or not worker.alive(),
        timeout=90,
        what="the worker to process every confirmed message",
    )
    assert worker.alive(), f"the worker exited instead of resuming:\n{worker.output()[-3000:]}"
    lost = sorted(set(traffic.confirmed) - set(worker.seen()))
    assert lost == [], f"{len(lost)} confirmed messages never processed: {lost[:20]}"
    assert await worker.terminate() == 0, worker.output()[-3000:]


@pytest.mark.rabbitmq
@pytest.mark.slow
async def test_rabbitmq_restarted_and_crashed_under_traffic(
    rabbitmq_node: PrivateRabbitMQ, serve: Callable[..., Served]
) -> None:
    url = rabbitmq_node.url
    queue = unique("restart")
    worker = serve(url, queue).start()

    async def restart(send_during_outage: SendDuringOutage) -> None:
        await asyncio.to_thread(rabbitmq_node.stop)  # clean shutdown: connections closed by the server
        send_during_outage()
        await asyncio.sleep(1)
        await asyncio.to_thread(rabbitmq_node.start)
        # the worker back before the crash: else both outages are one to it (the producer reconnects sooner)
        await wait_for(
            lambda: "RabbitMQ connection restored" in worker.output(), timeout=60, what="the worker to reconnect"
        )

    async def crash(send_during_outage: SendDuringOutage) -> None:
        await asyncio.to_thread(rabbitmq_node.kill)  # SIGKILL: connections just vanish
        send_during_outage()
        await asyncio.to_thread(rabbitmq_node.start)

    traffic = await publish_through(url, queue, worker, [restart, crash])
    # RabbitMQ's publish waits for the connection (publish_timeout, 30 s) instead of failing: outages this
    # short fail nothing, and publishes made while the node was down went through once it was back.
    assert traffic.failures == []
    assert traffic.during == [None, None]
    await check_worker_got_everything(worker, traffic)
    output = worker.output()
    # taskstream's own account, one line per outage
    assert output.count("RabbitMQ connection to") >= 2 and "restored" in output, output[-5000:]
    assert "Reconnecting after" not in output  # the driver's retry chatter stays out of the log


@pytest.mark.azure
@pytest.mark.slow
async def test_azurite_restarted_under_traffic(tmp_path: Path, serve: Callable[..., Served]) -> None:
    server = PrivateAzurite(tmp_path)
    try:
        server.start()
    except Unavailable as exc:
        unavailable(f"a private Azurite cannot start here: {exc}")
    try:
        queue = unique("restart")
        worker = serve(server.url, queue).start()

        async def restart(send_during_outage: SendDuringOutage) -> None:
            await asyncio.to_thread(server.stop)
            publish = send_during_outage()
            # Down until that publish has given up: the SDK retries for about 18 s (retry_total=3 with back-off),
            # so an outage of a few seconds would only prove that publishes wait.
            await wait_for(publish.done, timeout=90, what="the publish during the outage to give up")
            await asyncio.to_thread(server.start)

        traffic = await publish_through(server.url, queue, worker, [restart])
        # taskstream raises BrokerConnectionError naming the server, for the publish made during the outage and
        # for the producer's own publishes that ran into it.
        [during] = traffic.during
        assert isinstance(during, BrokerConnectionError), traffic.during
        assert traffic.failures, "no publish failed although the server was down longer than the SDK retries"
        server_address = f"127.0.0.1:{server.port}"
        for exc in traffic.failures:
            assert isinstance(exc, BrokerConnectionError), repr(exc)
            assert "cannot reach Azure Storage" in str(exc) and server_address in str(exc), str(exc)
        await check_worker_got_everything(worker, traffic)
    finally:
        server.stop()


@pytest.mark.sqs
@pytest.mark.slow
async def test_sqs_unreachable_then_back_under_traffic(serve: Callable[..., Served]) -> None:
    """moto keeps its queues in memory, so a real restart would lose them: the outage is a proxy going down."""
    proxy = TcpProxy(urlsplit(SQS_ENDPOINT).port or 80)
    await proxy.up()
    url = f"sqs://us-east-1/?endpoint_url=http://127.0.0.1:{proxy.port}&queue_prefix={SQS_PREFIX}&visibility_timeout=2&wait_time=2"
    queue = unique("outage")
    worker = serve(url, queue).start()

    async def outage(send_during_outage: SendDuringOutage) -> None:
        await proxy.down()
        send_during_outage()
        await asyncio.sleep(6)
        await proxy.up()

    try:
        traffic = await publish_through(url, queue, worker, [outage])
        # botocore retries for about 2 s, then taskstream raises BrokerConnectionError naming the endpoint.
        assert isinstance(traffic.during[0], BrokerConnectionError), traffic.during
        assert all("cannot reach SQS" in str(exc) for exc in traffic.failures), traffic.failures
        await check_worker_got_everything(worker, traffic)
    finally:
        await proxy.down()
        async with broker_from_url(url.replace(f"127.0.0.1:{proxy.port}", urlsplit(SQS_ENDPOINT).netloc)) as b:
            for name in (queue, b.dead_letter_name(queue)):
                await b.delete_queue(name)


@pytest.mark.sqs
async def test_sqs_outage_is_logged_once_not_per_receive_and_retry(serve: Callable[..., Served]) -> None:
    proxy = TcpProxy(urlsplit(SQS_ENDPOINT).port or 80)
    await proxy.up()
    url = f"sqs://us-east-1/?endpoint_url=http://127.0.0.1:{proxy.port}&queue_prefix={SQS_PREFIX}&wait_time=2"
    queue = unique("outage-log")
    worker = serve(url, queue).start()
    try:
        await wait_for(
            lambda: "app started" in worker.output() or not worker.alive(), timeout=60, what="the worker to start"
        )
        await asyncio.sleep(0.5)
        await proxy.down()
        await asyncio.sleep(4)
        await proxy.up()
        await asyncio.sleep(2)
        assert await worker.terminate() == 0
    finally:
        await proxy.down()
        async with broker_from_url(url.replace(f"127.0.0.1:{proxy.port}", urlsplit(SQS_ENDPOINT).netloc)) as b:
            for name in (queue, b.dead_letter_name(queue)):
                await b.delete_queue(name)
    failures = [line for line in worker.output().splitlines() if "receive from" in line and "failed" in line]
    assert 1 <= len(failures) <= 2, "\n".join(failures)
