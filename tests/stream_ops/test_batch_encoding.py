"""How a stage encodes what it sends: the records of one call for one queue in one ``dumps`` (the same bytes as
one record at a time), an item that cannot be encoded left out alone, and chunks packed into batch messages
under the byte limit, in order."""

from __future__ import annotations

from typing import Any

from taskstream.messages import loads
from taskstream.stream_ops import Pipeline
from taskstream.stream_ops.keygroups import group_of, owner
from taskstream.stream_ops.outbox import Outbox
from taskstream.stream_ops.wire import BatchLimits, batch_entry, is_batch, pack_records


class Opaque:
    """A value the wire format cannot encode."""


def spread_plan() -> Any:
    p = Pipeline("encoding")
    p.source("numbers", range(10)).key_by(lambda n: f"k{n}").stage("sum").map_value(lambda n: n).collect()
    p.stage("sum").parallelism(3)
    return p.plan()


def records_of(messages: list[Any]) -> list[list[Any]]:
    docs = [loads(m.body) for m in messages]
    assert all(is_batch(doc) for doc in docs)
    return [r for doc in docs for r in doc["body"]]


def test_outbox_encodes_per_queue_what_one_record_at_a_time_would_and_counts_groups() -> None:
    plan = spread_plan()
    target = plan.stages["sum"]
    outbox = Outbox(plan, plan.stages["numbers"], 0, lambda: 1.0)
    items = [(f"k{i}", {"n": i}) for i in range(40)]
    lineage: list[str | None] = [f"numbers#{i}" for i in range(40)]
    assert outbox.add(target, target.entries, items, lineage) is None
    queues = outbox.take()
    got = {queue: records_of(messages) for queue, messages in queues.items()}
    assert sum(len(r) for r in got.values()) == 40 and len(queues) > 1
    expected: dict[str, list[bytes]] = {}
    for record in (r for rows in got.values() for r in rows):
        mid, to, group, key, value = record
        assert group == group_of(key) and to == target.entries[0]
        expected.setdefault(target.queues[owner(group, 3)], []).append(batch_entry((key, value), to, mid, group))
    for queue, messages in queues.items():
        [message] = messages
        assert message.body.endswith(b',"body":[' + b",".join(expected[queue]) + b"]}")
        assert [r[3] for r in got[queue]] == [k for k, _ in items if target.queues[owner(group_of(k), 3)] == queue]
    counts: dict[str, int] = {}
    for key, _ in items:
        counts[str(group_of(key))] = counts.get(str(group_of(key)), 0) + 1
    assert outbox.sent["sum"] == counts


def test_an_item_that_cannot_be_encoded_is_left_out_alone_and_not_counted() -> None:
    plan = spread_plan()
    target = plan.stages["sum"]
    outbox = Outbox(plan, plan.stages["numbers"], 0, lambda: 1.0)
    items: list[Any] = [(f"k{i}", Opaque() if i == 5 else i) for i in range(12)]
    failed = outbox.add(target, target.entries, items, [f"numbers#{i}" for i in range(12)])
    assert failed is not None and list(failed) == [5] and "Opaque" in str(failed[5])
    sent = sorted((r[3], r[4]) for messages in outbox.take().values() for r in records_of(messages))
    assert sent == sorted((f"k{i}", i) for i in range(12) if i != 5)
    assert sum(outbox.sent["sum"].values()) == 11 and str(group_of("k5")) not in outbox.sent["sum"]


def chunk(first: int, n: int, pad: int = 0) -> tuple[list[list[Any]], bytes]:
    from taskstream.messages import dumps

    rows: list[list[Any]] = [[f"id{i}", "count", 1, "k", "x" * pad] for i in range(first, first + n)]
    return rows, dumps(rows)


def test_pack_records_joins_chunks_in_order_and_splits_one_over_the_limit() -> None:
    chunks = [chunk(0, 3), chunk(3, 4), chunk(7, 30, pad=40), chunk(37, 1, pad=900), chunk(38, 2)]
    [one] = pack_records(chunks, "src/0", 1.0)
    assert [r[0] for r in records_of([one])] == [f"id{i}" for i in range(40)]
    limits = BatchLimits(max_bytes=600)
    small = pack_records(chunks, "src/0", 1.0, limits)
    assert [r[0] for r in records_of(small)] == [f"id{i}" for i in range(40)]
    per_message = [[r[0] for r in records_of([m])] for m in small]
    assert per_message[0] == [f"id{i}" for i in range(7)]  # the two small chunks share a message
    assert ["id37"] in per_message  # a record over the limit travels alone
    assert all(len(m.body) < 600 + 200 for m in small if len(records_of([m])) > 1)  # the head adds < 200 bytes
    assert len(small) >= 2 + 30 * 70 // 600


def test_read_records_takes_a_well_formed_batch_whole_and_anything_else_record_by_record() -> None:
    from taskstream.stream_ops.inbound import read_records

    both = ["tumbling", "sliding"]
    raw: list[Any] = [[f"r{i}", both, i % 4, f"s{i % 4}" if i % 3 else None, {"n": i}] for i in range(9)]
    read = read_records(raw, "up/0", both, set())
    assert read.fresh == [f"r{i}" for i in range(9)] and not read.bad and read.duplicates == 0
    assert read.runs() == [
        (("tumbling", "sliding"), [{"n": i} if i % 3 == 0 else (f"s{i % 4}", {"n": i}) for i in range(9)], read.fresh)
    ]
    assert read.groups == {0: 3, 1: 2, 2: 2, 3: 2}
    one_each = [[f"q{i}", both[i % 2], 1, "k", i] for i in range(4)]
    assert [(t, ids) for t, _, ids in read_records(one_each, "up/0", both, set()).runs()] == [
        ("tumbling", ["q0"]),
        ("sliding", ["q1"]),
        ("tumbling", ["q2"]),
        ("sliding", ["q3"]),
    ]
    again = read_records([*raw[:3], raw[1], ["x", "nowhere", 1, "k", 0]], "up/0", both, {"r0"})
    assert again.fresh == ["r1", "r2"] and again.duplicates == 2
    assert [index for index, _, _ in again.bad] == [4]
