"""The polling brokers (SQS on moto, Azure Storage Queues on Azurite) under many connection cuts in a row.

A TcpProxy stands between taskstream and the server; while a Producer publishes batches and a Consumer
consumes through it, every connection is aborted 40 times, 50-100 ms apart. No publish may raise to the
caller, the consumer may not stop by itself, and every published message is handled at least once (moto and
a lost delete may deliver twice: duplicates are fine, losses are not).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import pytest

from taskstream.brokers.azure_queues import AzureQueueBroker, azure_queue_name
from taskstream.brokers.base import Broker
from taskstream.brokers.sqs import SQSBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.producer import Producer
from tests.brokers.contract.backends.sqs import ENDPOINT as SQS_ENDPOINT
from tests.brokers.contract.backends.sqs import make as make_sqs
from tests.support.cuts import Publisher, cut_rapidly
from tests.support.names import unique
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

CUTS = 40
BATCH = 20

# Azurite's published development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_QUEUE_PORT = 10001


@contextlib.asynccontextmanager
async def proxied(port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(port)
    await proxy.up()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def cut_while_traffic_flows(broker: Broker, queue: str, proxy: TcpProxy) -> None:
    """Publish batches and consume them through ``proxy`` while it cuts every connection ``CUTS`` times."""
    seen: set[int] = set()

    async def handle(message: Message) -> None:
        seen.add(message.envelope.body)

    consumer = Consumer(
        broker, queue, handle, ConsumerConfig(prefetch=20, concurrency=10, max_attempts=1000, retry_delay=0.1)
    )
    await consumer.start()
    publisher = Publisher(Producer(broker, max_in_flight=4), queue, batch=BATCH)

    def healthy() -> None:
        publisher.check()
        if not consumer.running:
            raise AssertionError(f"the consumer stopped by itself: {consumer.failure}")

    try:
        await cut_rapidly(proxy, CUTS, healthy)
        sent = await publisher.stop()
        assert sent > 0

        def all_seen() -> bool:
            healthy()
            return len(seen) == sent

        await wait_for(all_seen, timeout=90, what=f"all {sent} messages consumed")
    finally:
        await publisher.cancel()
        await consumer.stop(grace=5)
    assert seen == set(range(sent))
    assert consumer.failure is None
    assert proxy.cuts >= CUTS


@pytest.mark.sqs
async def test_sqs_publish_and_consume_survive_rapid_cuts() -> None:
    async with proxied(urlsplit(SQS_ENDPOINT).port or 80) as proxy:
        broker = make_sqs(visibility_timeout=3, endpoint_url=f"http://127.0.0.1:{proxy.port}", wait_time=1)
        assert isinstance(broker, SQSBroker)
        queue = unique("rapid-cuts")
        await broker.connect()
        try:
            await cut_while_traffic_flows(broker, queue, proxy)
        finally:
            await broker.close()
            async with make_sqs() as admin:
                for name in (queue, admin.dead_letter_name(queue)):
                    with contextlib.suppress(Exception):
                        await admin.delete_queue(name)


@pytest.mark.azure
async def test_azure_publish_and_consume_survive_rapid_cuts() -> None:
    async with proxied(AZURITE_QUEUE_PORT) as proxy:
        url = f"azurequeue://devstoreaccount1:{quote(AZURITE_KEY, safe='')}@127.0.0.1:{proxy.port}/devstoreaccount1"
        broker = AzureQueueBroker.from_url(url, visibility_timeout=3, poll_interval=0.2)
        queue = azure_queue_name(unique("rapid-cuts"))
        await broker.connect()
        try:
            await cut_while_traffic_flows(broker, queue, proxy)
        finally:
            await broker.close()
            direct = url.replace(f":{proxy.port}/", f":{AZURITE_QUEUE_PORT}/")
            async with AzureQueueBroker.from_url(direct) as admin:
                for name in (queue, admin.dead_letter_name(queue)):
                    with contextlib.suppress(Exception):
                        await admin.delete_queue(name)


@pytest.mark.sqs
async def test_sqs_subscription_started_in_an_outage_waits_for_sqs() -> None:
    """A subscription's first step (looking its queue up) is retried with back-off like its receives, instead
    of failing the subscription (and stopping its consumer) for good when SQS cannot be reached just then."""
    admin = make_sqs(visibility_timeout=3)
    queue = unique("outage-start")
    await admin.connect()
    try:
        await admin.declare(queue)
        await admin.publish(queue, b"waited")
        async with proxied(urlsplit(SQS_ENDPOINT).port or 80) as proxy:
            broker = make_sqs(visibility_timeout=3, endpoint_url=f"http://127.0.0.1:{proxy.port}", wait_time=1)
            await broker.connect()  # a fresh broker: its subscription looks the queue up
            try:
                await proxy.down()
                async with broker.consume(queue, prefetch=1) as subscription:
                    receiving = asyncio.ensure_future(subscription.__anext__())
                    # past botocore's retries (about 2 s), while the receive cannot get through
                    await asyncio.sleep(5)
                    if receiving.done():
                        raise AssertionError(f"the subscription ended during the outage: {receiving.exception()!r}")
                    await proxy.up()
                    delivery = await asyncio.wait_for(receiving, 60)
                    assert delivery.body == b"waited"
                    await delivery.ack()
            finally:
                await broker.close()
    finally:
        for name in (queue, admin.dead_letter_name(queue)):
            with contextlib.suppress(Exception):
                await admin.delete_queue(name)
        await admin.close()
