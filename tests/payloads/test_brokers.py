"""The threshold on every broker of the contract suite, with the store that goes with it.

For each backend (memory, RabbitMQ, SQS on moto, Azure Queues on Azurite, ZeroMQ) an envelope of exactly the
inline limit travels inline and the broker takes it (so the headroom is enough for the headers), one byte
more travels by reference, the consumer hands both bodies to the handler, and the payload is gone after the
ack. SQS pairs with S3 on moto and Azure Queues with Azure Blob on Azurite; the others use a local directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskstream.brokers.base import Broker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.messages import Envelope
from taskstream.payloads import BlobStore, ClaimCheck, is_reference
from taskstream.producer import Producer
from tests.brokers.contract.backends import BackendSpec, all_specs
from tests.payloads.conftest import make_store

STORE_FOR = {"sqs": "s3", "azure": "azureblob"}
#: brokers whose own limit is too large to fill cheaply get an explicit threshold instead
CHEAP_LIMIT = 2 * 1024 * 1024
OVERRIDE = 64 * 1024


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" in metafunc.fixturenames:
        metafunc.parametrize(
            "spec", [pytest.param(s, id=s.name, marks=getattr(pytest.mark, s.name)) for s in all_specs()]
        )


def sized(size: int, overhead: int) -> Envelope:
    return Envelope(id="e" * 32, kind="task", created_at=1.0, body="p" * (size - overhead))


async def test_threshold_inline_then_by_reference_then_cleaned(spec: BackendSpec, tmp_path: Path) -> None:
    if spec.setup is not None:
        await spec.setup()
    store: BlobStore = make_store(STORE_FOR.get(spec.name, "local"), tmp_path)
    broker: Broker = spec.make(visibility_timeout=None)
    await broker.connect()
    queue = spec.queue_name(f"pl-{uuid.uuid4().hex[:10]}")
    consumer: Consumer | None = None
    try:
        limit = broker.capabilities.max_message_bytes
        check = ClaimCheck(store, threshold=OVERRIDE if limit > CHEAP_LIMIT else None)
        producer = Producer(broker, claim_check=check)
        expected = OVERRIDE if limit > CHEAP_LIMIT else max(limit // 2, limit - 4096)
        assert producer.inline_limit == expected
        overhead = len(producer.encode(sized(100, 0))) - 100
        at_limit = sized(producer.inline_limit, overhead)
        over = sized(producer.inline_limit + 1, overhead)
        over.id = "f" * 32
        data, ref = await producer.prepare(at_limit)
        assert len(data) == producer.inline_limit and ref is None
        await broker.declare(queue)
        await producer.send(queue, at_limit)  # the broker takes a message of exactly the threshold
        await producer.send(queue, over)
        assert len([b async for b in store.list()]) == 1

        got: dict[str, Any] = {}
        raw: dict[str, bytes] = {}

        async def handle(message: Message) -> None:
            got[message.envelope.id] = message.envelope.body
            raw[message.envelope.id] = message.delivery.body

        consumer = Consumer(broker, queue, handle, ConsumerConfig(max_attempts=2), claim_check=check)
        await consumer.start()
        async with asyncio.timeout(60):
            while consumer.stats.acked < 2:
                await asyncio.sleep(0.05)
        await consumer.stop(grace=10)  # lets the second message's release (after its ack) finish
        stats, consumer = consumer.stats, None
        assert got == {at_limit.id: at_limit.body, over.id: over.body}
        assert not is_reference(raw[at_limit.id]) and is_reference(raw[over.id])
        assert [b async for b in store.list()] == []  # released after the ack
        assert stats.dead_lettered == 0
    finally:
        if consumer is not None:
            await consumer.stop(grace=5)
        for name in (queue, broker.dead_letter_name(queue)):
            with contextlib.suppress(Exception):
                await broker.delete_queue(name)
        await broker.close()
