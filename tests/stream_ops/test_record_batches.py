"""Record batches between stages: many records per broker message, deduplicated per record, a malformed record
dead-lettered alone, the applied-id memory snapshotted one row per message (on the memory broker)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from taskstream.brokers.memory import MemoryBroker
from taskstream.messages import dumps, loads
from taskstream.stream_ops import CallbackSink, MemoryStateStore, Pipeline, RunConfig
from taskstream.stream_ops.lineage import BATCH_ROW, ROW, AppliedIds
from taskstream.stream_ops.wire import BatchLimits, batch_entry, batch_messages, is_batch


def test_batch_messages_pack_records_in_order_and_split_at_the_byte_limit() -> None:
    records = [(f"id{i}", batch_entry(("k", {"n": i}), "count", f"id{i}", 5)) for i in range(100)]
    [one] = batch_messages(records, "src/0", 1.0)
    doc = loads(one.body)
    assert is_batch(doc) and doc["kind"] == "record" and doc["headers"]["src"] == "src/0"
    assert [r[0] for r in doc["body"]] == [f"id{i}" for i in range(100)]
    assert doc["body"][3] == ["id3", "count", 5, "k", {"n": 3}]
    small = batch_messages(records, "src/0", 1.0, BatchLimits(max_bytes=500))
    assert len(small) > 1 and all(len(m.body) < 700 for m in small)
    assert [r[0] for m in small for r in loads(m.body)["body"]] == [f"id{i}" for i in range(100)]


def test_applied_ids_keep_one_row_per_batch_and_the_last_input_batch_whole() -> None:
    applied = AppliedIds(per_sender=10)
    applied.add_many("up/0", [f"a{i}" for i in range(50)])  # one input batch, 5x the memory
    rows = applied.changes()
    assert [name for name in rows if name.startswith(BATCH_ROW)] == [f"{BATCH_ROW}up/0\x1f1"]
    assert all(f"a{i}" in applied for i in range(50))  # kept whole: it is the batch just committed
    applied.add_many("up/0", ["b1", "b2", "a3"])  # a3 was applied: not remembered twice
    rows = applied.changes()
    assert rows == {f"{BATCH_ROW}up/0\x1f2": ["up/0", 2, ["b1", "b2"]]}
    assert "a0" in applied  # forgetting the first batch would leave fewer than per_sender ids
    applied.add_many("up/0", [f"c{i}" for i in range(10)])
    rows = applied.changes()
    assert rows[f"{BATCH_ROW}up/0\x1f1"] is None and rows[f"{BATCH_ROW}up/0\x1f2"] is None
    assert "a0" not in applied and "b1" not in applied and "c0" in applied
    restored = AppliedIds(per_sender=10)
    restored.restore({f"{BATCH_ROW}up/0\x1f2": ["up/0", 2, ["b1", "b2"]], f"{ROW}c1": ["ctl", 1]})
    assert "b2" in restored and "c1" in restored and "a3" not in restored


def counting_pipeline(name: str, seen: list[Any]) -> Pipeline:
    p = Pipeline(name)
    (
        p.source("numbers", [{"n": i} for i in range(500)])
        .key_by(lambda r: f"k{r['n'] % 7}")
        .stage("sum")
        .map_value(lambda r: r["n"])
        .sink(CallbackSink(seen.extend, per_batch=True))
    )
    p.stage("sum").parallelism(2)
    return p


async def test_a_distributed_run_moves_many_records_per_message_with_the_fused_results() -> None:
    broker = MemoryBroker()
    published: list[bytes] = []
    original = broker.publish_batch

    async def spy(queue: str, messages: Any) -> None:
        published.extend(m.body for m in messages if queue.startswith("batches-"))
        await original(queue, messages)

    broker.publish_batch = spy  # type: ignore[method-assign]
    seen: list[Any] = []
    await broker.connect()
    try:
        await counting_pipeline("batches", seen).run_distributed(broker)
    finally:
        await broker.close()
    assert sorted(v for _, v in seen) == list(range(500))
    records = [r for body in published if is_batch(doc := orjson.loads(body)) for r in doc["body"]]
    assert len(records) == 500 and len(published) < 50


async def test_a_malformed_record_is_dead_lettered_alone_and_a_duplicate_skipped() -> None:
    seen: list[Any] = []
    p = counting_pipeline("hostile-batch", seen)
    plan = p.plan()
    queue = plan.stages["sum"].queue(0)
    [step] = plan.stages["sum"].entries
    good = [[f"r{i}", step, 0, "k0", {"n": i}] for i in range(5)]
    hostile: list[Any] = [good[0], good[1], ["r9", step, 999, "k0", {"n": 9}], good[2], "nonsense", good[1]]
    head = {"ts": 1, "id": "b1", "kind": "record", "created_at": time.time(), "headers": {"src": "numbers/0"}}
    broker = MemoryBroker()
    await broker.connect()
    try:
        await broker.declare(queue)
        doc = {**head, "headers": {"src": "numbers/0", "batch": 1}, "body": hostile}
        await broker.publish(queue, dumps(doc), headers={}, message_id="b1")
        await broker.publish(queue, dumps({**doc, "id": "b2", "body": good[2:]}), headers={}, message_id="b2")
        await broker.publish(queue, dumps({"ts": 1, "id": "e", "kind": "control", "body": {"control": "stop"}}))
        config = RunConfig(batch_size=1)  # one message per input batch: the stop comes after both
        result = await p.run_stage("sum", 0, broker=broker, store=MemoryStateStore(), config=config)
        dead = broker.consume(plan.dead_letter_queue, prefetch=10)
        letters = []
        async with asyncio.timeout(10):
            for _ in range(2):
                delivery = await dead.__anext__()
                letters.append((loads(delivery.body), delivery.headers))
                await delivery.ack()
        await dead.close()
    finally:
        await broker.close()
    assert sorted(v for _, v in seen) == [0, 1, 2, 3, 4]  # r2 came twice (both batches): applied once
    assert result.duplicates_skipped == 2 and result.dead_lettered == 2
    reasons = sorted(h["x-death-reason"] for _, h in letters)
    assert "'g' must be a key group" in reasons[0] and "not a list" in reasons[1]
    assert sorted(str(body) for body, _ in letters)[0].startswith("['r9'")
    assert {h["x-batch-id"] for _, h in letters} == {"b1"}
