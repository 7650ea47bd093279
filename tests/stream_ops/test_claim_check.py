"""Large stream records travel by reference (claim-check): between stages, through QueueSink to QueueSource and
to and from a service, on the memory broker with a small limit and on RabbitMQ; a missing or corrupt payload
dead-letters with the reason (keeping its reference) while the other records flow, an unreachable store
requeues; payloads are deleted once their delivery is acked."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskstream.brokers.base import Broker, broker_from_url
from taskstream.brokers.memory import MemoryBroker
from taskstream.payloads import ClaimCheck, LocalStore, PayloadRef, PayloadStoreError, is_reference
from taskstream.producer import Producer
from taskstream.stream_ops import ListSink, MemoryStateStore, Pipeline, QueueSink, QueueSource
from taskstream.stream_ops.service import Service, ServiceClient
from taskstream.stream_ops.wire import record_message
from tests.support.waiting import wait_for

AMQP_URL = os.environ.get("TASKSTREAM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: the memory broker's limit in these tests: records over 2048 encoded bytes go by reference
LIMIT = 4096


class CountingStore(LocalStore):
    """A local directory store that counts writes and deletes, to show records really went by reference."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.puts = 0
        self.deletes = 0

    async def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        await super().put(key, data)

    async def delete(self, key: str) -> None:
        self.deletes += 1
        await super().delete(key)


async def stored_keys(store: LocalStore) -> list[str]:
    return [info.key async for info in store.list()]


async def _none_stored(store: LocalStore) -> bool:
    return not await stored_keys(store)


def frames(n: int = 40) -> list[dict[str, Any]]:
    """Records from 150 bytes to about 10 KB encoded: the small ones travel inline, the others by reference."""
    return [{"cam": f"c{i % 3}", "seq": i, "data": bytes([i]) * (180 * i)} for i in range(n)]


def frames_pipeline(name: str, sink: ListSink) -> Pipeline:
    p = Pipeline(name)
    grown = p.source("frames", frames()).stage("grow").map(lambda f: {**f, "data": f["data"] * 2}, name="grow")
    per_cam = grown.key_by(lambda f: f["cam"]).batch(100, name="per-cam", stage="collect")  # 100 KB lists
    per_cam.stage("store").sink(sink)
    p.stage("grow").parallelism(2)
    return p


def canon(items: list[Any]) -> list[tuple[str, list[tuple[int, bytes]]]]:
    return sorted((key, sorted((f["seq"], f["data"]) for f in batch)) for key, batch in items)


async def test_distributed_run_with_records_over_the_broker_limit_equals_the_fused_run(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "payloads")
    check = ClaimCheck(store)
    fused, dist = ListSink(), ListSink()
    await frames_pipeline("cc-fused", fused).run(MemoryBroker(max_message_bytes=LIMIT), claim_check=check)
    assert store.puts == 0  # fused: nothing crosses a queue

    broker = MemoryBroker(f"cc-{uuid.uuid4().hex[:6]}", max_message_bytes=LIMIT)
    results = await asyncio.wait_for(frames_pipeline("cc-dist", dist).run_distributed(broker, claim_check=check), 60)

    assert canon(dist.items) == canon(fused.items)
    assert len(dist.items) == 3 and sum(len(batch) for _, batch in dist.items) == 40
    crossings = 40 + 40 + 3  # frames -> grow -> collect -> store
    assert 0 < store.puts < crossings  # large records went by reference, small ones inline
    assert store.deletes == store.puts  # each payload deleted once, after its delivery was acked
    assert await stored_keys(store) == []
    assert sum(r.dead_lettered for runs in results.values() for r in runs) == 0


async def test_queue_sink_to_queue_source_by_reference_and_released_after_the_ack(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "payloads")
    check = ClaimCheck(store)
    broker = MemoryBroker(f"cc-{uuid.uuid4().hex[:6]}", max_message_bytes=LIMIT)
    queue = f"cc-handoff-{uuid.uuid4().hex[:6]}"
    sent = frames(30)

    producer = Pipeline("cc-producer")
    producer.source("frames", sent).key_by(lambda f: f["cam"]).sink(QueueSink(queue))
    await producer.run(broker, claim_check=check)
    waiting = await stored_keys(store)
    assert waiting and len(waiting) == store.puts < len(sent)  # the large ones wait in the store as references

    consumer = Pipeline("cc-consumer")
    got = consumer.source("queue", QueueSource(queue, with_key=True, max_items=len(sent))).collect()
    await asyncio.wait_for(consumer.run(broker, claim_check=check), 30)

    assert sorted(got, key=lambda kv: kv[1]["seq"]) == [(f["cam"], f) for f in sent]
    assert await stored_keys(store) == []  # released once acked
    await broker.connect()
    assert await broker.depth(queue) == 0
    await broker.close()


async def test_missing_or_corrupt_payload_is_dead_lettered_with_the_reason_and_the_rest_flows(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "payloads")
    check = ClaimCheck(store)
    broker = MemoryBroker(f"cc-{uuid.uuid4().hex[:6]}", max_message_bytes=LIMIT)
    await broker.connect()

    def work(f: dict[str, Any]) -> dict[str, Any]:
        if f["seq"] == 11:
            raise ValueError("frame 11 is broken")
        return {"seq": f["seq"], "size": len(f["data"])}

    p = Pipeline("cc-missing")
    got = p.source("src", []).stage("work").map(work, name="work").collect()
    p.stage("work").bounded(idle_timeout=0.3)
    plan = p.plan()
    queue, entry = plan.stages["work"].queue(0), plan.stages["work"].entries[0]
    await broker.declare(queue)
    messages = [record_message(f, entry, "feed/0", time.time()) for f in frames(12)]
    messages = await Producer(broker, claim_check=check).offload_outgoing(messages)
    refs = {i: PayloadRef.from_bytes(m.body) for i, m in enumerate(messages) if is_reference(m.body)}
    assert set(refs) == {8, 9, 10, 11}  # 1.4 KB and more
    await store.delete(refs[8].key)  # gone (expired too early, say)
    await store.put(refs[10].key, bytes(refs[10].size))  # overwritten: right size, wrong bytes
    await broker.publish_batch(queue, messages)

    result = await asyncio.wait_for(p.run_stage("work", broker=broker, store=MemoryStateStore(), claim_check=check), 30)

    assert sorted(r["seq"] for r in got) == [i for i in range(12) if i not in (8, 10, 11)]
    assert result.dead_lettered == 3
    subscription = broker.consume(plan.dead_letter_queue)
    dead = []
    async with asyncio.timeout(5):
        for _ in range(3):
            delivery = await subscription.__anext__()
            dead.append(delivery)
            await delivery.ack()
    await subscription.close()
    reasons = {d.headers["x-death-reason"] for d in dead}
    assert f"payload unavailable: payload {refs[8].key!r} is not in {store.location}" in reasons
    assert any(r.startswith("payload unavailable:") and "fails its checksum" in r for r in reasons)
    assert any("frame 11 is broken" in r for r in reasons)
    # dead letters keep their payloads: the unreadable ones as they came, frame 11 offloaded again
    assert all(is_reference(d.body) for d in dead)
    kept = await stored_keys(store)
    assert refs[10].key in kept and len(kept) == 2
    assert PayloadRef.from_bytes(next(d.body for d in dead if "frame 11" in d.headers["x-death-reason"])).key in kept
    await broker.close()


def camera_pipeline(name: str, sink: ListSink) -> Pipeline:
    rng = np.random.default_rng(5)
    shots = [{"cam": f"cam{i % 2}", "seq": i, "image": rng.random((640, 640), dtype=np.float32)} for i in range(6)]
    p = Pipeline(name)
    keyed = p.source("camera", shots).key_by(lambda s: s["cam"])
    stats = keyed.stage("stats").map_value(lambda s: {**s, "mean": float(s["image"].mean())}, name="stats")
    stats.stage("store").sink(sink)
    p.stage("stats").parallelism(2)
    return p


@pytest.mark.rabbitmq
async def test_numpy_frames_of_megabytes_through_rabbitmq_by_reference(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "payloads")
    check = ClaimCheck(store)
    fused, dist = ListSink(), ListSink()
    await camera_pipeline("cc-cam-fused", fused).run(claim_check=check)

    name = f"cc-cam-{uuid.uuid4().hex[:6]}"
    pipeline = camera_pipeline(name, dist)
    broker: Broker = broker_from_url(f"{AMQP_URL}?max_message_bytes=1048576")  # frames are 1.6 MB, 2.2 MB encoded
    try:
        await asyncio.wait_for(pipeline.run_distributed(broker, claim_check=check), 120)
    finally:
        await broker.connect()
        plan = pipeline.plan()
        for queue in [q for sp in plan.stages.values() for q in sp.queues] + [plan.dead_letter_queue]:
            await broker.delete_queue(queue)
        await broker.close()

    def by_seq(items: list[Any]) -> dict[int, tuple[str, dict[str, Any]]]:
        return {value["seq"]: (key, value) for key, value in items}

    expected, got = by_seq(fused.items), by_seq(dist.items)
    assert sorted(got) == sorted(expected) == list(range(6))
    for seq, (key, value) in expected.items():
        assert got[seq][0] == key and got[seq][1]["mean"] == value["mean"]
        assert got[seq][1]["image"].dtype == np.float32
        assert np.array_equal(got[seq][1]["image"], value["image"])
    assert store.puts == 12  # every frame crossed two queues by reference
    assert store.deletes == 12 and await stored_keys(store) == []


async def test_service_requests_and_replies_over_the_broker_limit_travel_by_reference(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "payloads")
    check = ClaimCheck(store)

    def snap(request: dict[str, Any]) -> np.ndarray:
        return np.full((64, 64), len(request["settings"]), dtype=np.float64)  # 32 KB reply

    service = Service("cc-camera", snap, lock_path=False, claim_check=check)
    async with MemoryBroker(f"cc-{uuid.uuid4().hex[:6]}", max_message_bytes=LIMIT) as broker:
        await service.start(broker)
        try:
            async with ServiceClient(broker, claim_check=check) as client:
                image = await client.call("cc-camera", {"settings": "x" * 5000}, timeout=10)
                # the reply's payload goes right after its ack
                await wait_for(lambda: _none_stored(store), what="the reply's payload deleted", timeout=5)
        finally:
            await service.stop()
    assert isinstance(image, np.ndarray) and image.shape == (64, 64) and float(image[0, 0]) == 5000.0
    assert store.puts == 2 and store.deletes == 2  # request and reply both went by reference


class FlakyStore(CountingStore):
    """A local store whose first read fails as an unreachable cloud store would."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.failures = 1

    async def get(self, key: str) -> bytes:
        if self.failures:
            self.failures -= 1
            raise PayloadStoreError("store unreachable (injected)")
        return await super().get(key)


async def test_unreachable_store_requeues_the_record_which_then_goes_through(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "payloads")
    check = ClaimCheck(store)
    broker = MemoryBroker(f"cc-{uuid.uuid4().hex[:6]}", max_message_bytes=LIMIT)
    await broker.connect()
    p = Pipeline("cc-flaky")
    got = p.source("src", []).stage("work").map(lambda f: f["seq"], name="seq").collect()
    p.stage("work").bounded(max_messages=3)
    plan = p.plan()
    queue, entry = plan.stages["work"].queue(0), plan.stages["work"].entries[0]
    await broker.declare(queue)
    messages = [record_message(f, entry, "feed/0", time.time()) for f in frames(12)[9:]]
    await broker.publish_batch(queue, await Producer(broker, claim_check=check).offload_outgoing(messages))
    assert store.puts == 3

    result = await asyncio.wait_for(p.run_stage("work", broker=broker, store=MemoryStateStore(), claim_check=check), 30)

    assert sorted(got) == [9, 10, 11] and result.dead_lettered == 0 and store.failures == 0
    assert await stored_keys(store) == []
    await broker.close()
