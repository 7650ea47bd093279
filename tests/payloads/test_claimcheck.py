"""The claim-check through Producer and Consumer on the memory broker with a small size limit.

Each test uses a real store (the local one, and S3/Azure Blob where parametrized by ``store``) and a
``MemoryBroker`` whose limit is a few KiB, so thresholds are hit with small bodies.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from taskstream.brokers.base import Delivery, OutgoingMessage
from taskstream.brokers.memory import MemoryBroker
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import ConfigurationError, MessageTooLarge
from taskstream.messages import Envelope, decode, encode
from taskstream.payloads import (
    BlobStore,
    ClaimCheck,
    LocalStore,
    PayloadRef,
    is_reference,
)
from taskstream.producer import Producer

LIMIT = 8192


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    async with MemoryBroker(f"payloads-{uuid.uuid4().hex[:8]}", max_message_bytes=LIMIT) as b:
        yield b


async def blobs(store: BlobStore) -> list[str]:
    return [info.key async for info in store.list()]


async def take(broker: MemoryBroker, queue: str, timeout: float = 10.0) -> Delivery:
    async with broker.consume(queue, prefetch=1) as sub, asyncio.timeout(timeout):
        delivery = await sub.__anext__()
        await delivery.ack()
        return delivery


class Collect:
    """A consumer handler that records what it got and can fail on purpose."""

    def __init__(self, fail: bool = False) -> None:
        self.bodies: list[Any] = []
        self.fail = fail
        self.got = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        self.bodies.append(message.envelope.body)
        self.got.set()
        if self.fail:
            raise RuntimeError("handler failed on purpose")


async def run_until(consumer: Consumer, done: Any, timeout: float = 15.0) -> None:
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.02)
    finally:
        await consumer.stop(grace=5)


def test_threshold_is_the_limit_minus_headroom_or_the_override() -> None:
    assert ClaimCheck(None).threshold_for(65536) == 65536 - 4096
    assert ClaimCheck(None).threshold_for(4000) == 2000  # never below half the limit
    assert ClaimCheck(None, threshold=1000).threshold_for(65536) == 1000
    assert ClaimCheck(None, threshold=10**9).threshold_for(65536) == 65536  # capped to the broker's limit
    with pytest.raises(ConfigurationError, match="positive"):
        ClaimCheck(None, threshold=0)


async def test_small_stays_inline_large_goes_by_reference_and_is_deleted_after_ack(
    broker: MemoryBroker, store: BlobStore
) -> None:
    producer = Producer(broker, claim_check=ClaimCheck(store))
    assert producer.inline_limit == LIMIT - 4096
    await broker.declare("q")
    await producer.send("q", Envelope(body="small"))
    big = np.random.default_rng(3).random((20_000, 2))  # 320 kB: forty times the broker's limit
    await producer.send("q", Envelope(kind="task", body={"points": big}))
    assert len(await blobs(store)) == 1
    seen = Collect()
    consumer = Consumer(broker, "q", seen, ConsumerConfig(max_attempts=1), claim_check=ClaimCheck(store))
    await run_until(consumer, lambda: consumer.stats.acked == 2)
    assert seen.bodies[0] == "small"
    assert np.array_equal(seen.bodies[1]["points"], big)
    assert await blobs(store) == []  # deleted after the ack
    assert consumer.stats.dead_lettered == 0


async def test_exactly_at_the_threshold_is_inline_one_byte_more_is_offloaded(
    broker: MemoryBroker, local_store: LocalStore
) -> None:
    producer = Producer(broker, claim_check=ClaimCheck(local_store, threshold=1000))
    base = Envelope(id="x" * 32, body="", created_at=1.0)
    overhead = len(producer.encode(base))
    at = Envelope(id="x" * 32, body="a" * (1000 - overhead), created_at=1.0)
    over = Envelope(id="x" * 32, body="a" * (1001 - overhead), created_at=1.0)
    data_at, ref_at = await producer.prepare(at)
    data_over, ref_over = await producer.prepare(over)
    assert len(data_at) == 1000 and ref_at is None and not is_reference(data_at)
    assert ref_over is not None and is_reference(data_over) and len(data_over) < 400
    assert PayloadRef.from_bytes(data_over) == ref_over


async def test_checksum_mismatch_dead_letters_with_the_reason_and_keeps_the_blob(
    broker: MemoryBroker, store: BlobStore
) -> None:
    check = ClaimCheck(store)
    await broker.declare("q")
    await Producer(broker, claim_check=check).send("q", Envelope(body=b"\x01" * 50_000))
    (key,) = await blobs(store)
    data = await store.get(key)
    await store.put(key, data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one bit pattern changed
    seen = Collect()
    consumer = Consumer(broker, "q", seen, claim_check=check)
    await run_until(consumer, lambda: consumer.stats.dead_lettered == 1)
    assert seen.bodies == []  # the handler never saw corrupt data
    dead = await take(broker, "q.dlq")
    reason = str(dead.headers["x-death-reason"])
    assert "payload unavailable" in reason and "fails its checksum" in reason and key in reason
    assert is_reference(dead.body)  # the dead letter still points at its payload
    assert await blobs(store) == [key]


async def test_size_mismatch_is_reported_as_corrupt(broker: MemoryBroker, local_store: LocalStore) -> None:
    check = ClaimCheck(local_store)
    await broker.declare("q")
    await Producer(broker, claim_check=check).send("q", Envelope(body="z" * 20_000))
    (key,) = await blobs(local_store)
    await local_store.put(key, b"short")
    consumer = Consumer(broker, "q", Collect(), claim_check=check)
    await run_until(consumer, lambda: consumer.stats.dead_lettered == 1)
    dead = await take(broker, "q.dlq")
    assert "is 5 bytes, its reference says" in str(dead.headers["x-death-reason"])


async def test_missing_blob_dead_letters_with_the_reason(broker: MemoryBroker, store: BlobStore) -> None:
    check = ClaimCheck(store)
    await broker.declare("q")
    await Producer(broker, claim_check=check).send("q", Envelope(body="m" * 20_000))
    (key,) = await blobs(store)
    await store.delete(key)
    seen = Collect()
    consumer = Consumer(broker, "q", seen, claim_check=check)
    await run_until(consumer, lambda: consumer.stats.dead_lettered == 1)
    assert seen.bodies == []
    dead = await take(broker, "q.dlq")
    reason = str(dead.headers["x-death-reason"])
    assert "payload unavailable" in reason and "is not in" in reason and key in reason
    assert consumer.running is False


async def test_dead_lettered_message_keeps_its_payload_until_the_dead_letter_is_acked(
    broker: MemoryBroker, store: BlobStore
) -> None:
    check = ClaimCheck(store)
    await broker.declare("q")
    await Producer(broker, claim_check=check).send("q", Envelope(body=list(range(5000))))
    failing = Collect(fail=True)
    config = ConsumerConfig(max_attempts=2, retry_delay=0.01)
    consumer = Consumer(broker, "q", failing, config, claim_check=check)
    await run_until(consumer, lambda: consumer.stats.dead_lettered == 1)
    assert len(failing.bodies) == 2 and failing.bodies[0] == list(range(5000))  # resolved on every attempt
    assert len(await blobs(store)) == 1  # kept through the retries and the dead-lettering
    # Whoever consumes the dead letter and acks it is the last reader: then the payload goes.
    replay = Collect()
    dlq_consumer = Consumer(broker, "q.dlq", replay, claim_check=check)
    await run_until(dlq_consumer, lambda: dlq_consumer.stats.acked == 1)
    assert replay.bodies == [list(range(5000))]
    assert await blobs(store) == []


async def test_unreachable_store_is_retried_not_dead_lettered_at_once(
    broker: MemoryBroker, local_store: LocalStore, tmp_path: Any
) -> None:
    check = ClaimCheck(local_store)
    await broker.declare("q")
    await Producer(broker, claim_check=check).send("q", Envelope(body="r" * 20_000))
    # A plain file where the store's directory was: reads fail with NotADirectoryError, like a store that
    # is down (not a missing payload).
    aside = local_store.directory.with_name("aside")
    local_store.directory.rename(aside)
    local_store.directory.write_bytes(b"")
    try:
        consumer = Consumer(broker, "q", Collect(), ConsumerConfig(max_attempts=3, retry_delay=0.01), claim_check=check)
        await run_until(consumer, lambda: consumer.stats.dead_lettered == 1)
        assert consumer.stats.retried == 2
    finally:
        local_store.directory.unlink()
        aside.rename(local_store.directory)
    assert len(await blobs(local_store)) == 1  # kept for the dead letter
    dead = await take(broker, "q.dlq")
    assert "failed 3 times" in str(dead.headers["x-death-reason"])
    assert "cannot read payload" in str(dead.headers["x-death-reason"])


async def test_payload_from_another_store_or_host_is_refused_clearly(
    broker: MemoryBroker, local_store: LocalStore, tmp_path: Any
) -> None:
    await broker.declare("q")
    other = LocalStore(tmp_path / "elsewhere")
    await Producer(broker, claim_check=ClaimCheck(other)).send("q", Envelope(body="o" * 20_000))
    ref = PayloadRef.from_bytes((await take(broker, "q")).body)
    foreign = PayloadRef(
        store="file://some-other-host/var/payloads",
        key=ref.key,
        size=ref.size,
        sha256=ref.sha256,
        id=ref.id,
        kind=ref.kind,
    )
    for wire in (ref, foreign):
        await broker.publish("q", wire.to_bytes())
    consumer = Consumer(broker, "q", Collect(), claim_check=ClaimCheck(local_store))
    await run_until(consumer, lambda: consumer.stats.dead_lettered == 2)
    reasons = [str((await take(broker, "q.dlq")).headers["x-death-reason"]) for _ in range(2)]
    assert "not configured for" in reasons[0] + reasons[1]
    assert "on host 'some-other-host', out of reach" in reasons[0] + reasons[1]


async def test_disabled_claim_check_raises_message_too_large(broker: MemoryBroker) -> None:
    await broker.declare("q")
    producer = Producer(broker, claim_check=ClaimCheck.disabled())
    await producer.send("q", Envelope(body="a" * (LIMIT - 500)))  # over the threshold but fits: inline
    with pytest.raises(MessageTooLarge, match=str(LIMIT)):
        await producer.send("q", Envelope(body="a" * LIMIT))


async def test_rejected_publish_discards_the_offloaded_payload(broker: MemoryBroker, local_store: LocalStore) -> None:
    producer = Producer(broker, claim_check=ClaimCheck(local_store))
    with pytest.raises(Exception, match="never declared"):
        await producer.send("no-such-queue", Envelope(body="d" * 20_000))
    assert await blobs(local_store) == []


async def test_send_many_mixes_inline_and_references(broker: MemoryBroker, local_store: LocalStore) -> None:
    check = ClaimCheck(local_store)
    await broker.declare("q")
    envelopes = [Envelope(body="s" * (20_000 if i % 3 == 0 else 10), key=str(i)) for i in range(9)]
    await Producer(broker, claim_check=check).send_many("q", envelopes)
    assert len(await blobs(local_store)) == 3
    seen = Collect()
    consumer = Consumer(broker, "q", seen, claim_check=check)
    await run_until(consumer, lambda: consumer.stats.acked == 9)
    assert sorted(len(b) for b in seen.bodies) == [10] * 6 + [20_000] * 3
    assert await blobs(local_store) == []


async def test_topic_fanout_shares_one_payload_left_to_expiry(broker: MemoryBroker, local_store: LocalStore) -> None:
    check = ClaimCheck(local_store)
    await broker.declare("a", topics=["readings.#"])
    await broker.declare("b", topics=["readings.#"])
    await Producer(broker, claim_check=check).send_topic("readings.x", Envelope(body="t" * 20_000))
    got_a, got_b = Collect(), Collect()
    consumers = [Consumer(broker, "a", got_a, claim_check=check), Consumer(broker, "b", got_b, claim_check=check)]
    for consumer in consumers:
        await run_until(consumer, lambda c=consumer: c.stats.acked == 1)  # type: ignore[misc]
    assert got_a.bodies == got_b.bodies == ["t" * 20_000]
    assert len(await blobs(local_store)) == 1  # both queues read the same blob: not deleted on ack
    assert await local_store.expire(0, now=10**10) == 1


async def test_raw_readers_resolve_references_with_decode(broker: MemoryBroker, local_store: LocalStore) -> None:
    check = ClaimCheck(local_store)
    await broker.declare("q")
    await Producer(broker, claim_check=check).send("q", Envelope(body={"v": "w" * 20_000}))
    delivery = await take(broker, "q")
    plain = decode(delivery.body)  # the plain codec sees the reference document, not the body
    assert plain.kind == "raw" and plain.body["ts_ref"] == 1
    envelope = await check.decode(delivery.body)
    assert envelope.body == {"v": "w" * 20_000}


async def test_settings_choose_the_store_and_threshold(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("TASKSTREAM_PAYLOAD_STORE_URL", f"file://{tmp_path}/from-env")
    monkeypatch.setenv("TASKSTREAM_PAYLOAD_THRESHOLD", "1234")
    check = ClaimCheck.from_settings()
    assert isinstance(check.store, LocalStore) and check.store.directory == tmp_path / "from-env"
    assert check.threshold_for(65536) == 1234
    monkeypatch.setenv("TASKSTREAM_PAYLOAD_STORE_URL", "none")
    assert ClaimCheck.from_settings().store is None


async def test_pre_encoded_messages_are_offloaded_and_resolved(broker: MemoryBroker, local_store: LocalStore) -> None:
    """The byte-level path, for code that encodes its own messages and publishes with publish_batch."""
    check = ClaimCheck(local_store)
    producer = Producer(broker, claim_check=check)
    await broker.declare("q")
    envelopes = [Envelope(kind="result", body={"v": "b" * n}) for n in (10, 30_000)]
    outgoing = [OutgoingMessage(encode(e), {"ts_kind": e.kind}, message_id=e.id) for e in envelopes]
    sent = await producer.offload_outgoing(outgoing)
    assert sent[0] is outgoing[0] and is_reference(sent[1].body)
    assert PayloadRef.from_bytes(sent[1].body).format == "json"
    await broker.publish_batch("q", sent)
    refs = []
    for expected in envelopes:
        envelope, ref = await check.open((await take(broker, "q")).body)
        assert envelope.body == expected.body and envelope.kind == "result"
        refs.append(ref)
    assert refs[0] is None and refs[1] is not None
    assert await check.release(refs[1]) and await blobs(local_store) == []
    with pytest.raises(MessageTooLarge):
        await Producer(broker, claim_check=ClaimCheck.disabled()).offload_outgoing(
            [OutgoingMessage(b"x" * (LIMIT + 1))]
        )
