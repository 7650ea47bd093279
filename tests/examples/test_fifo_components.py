"""Scenario S6: a front-end on a FIFO queue, a back-end with 2 replicas, results in SQLite, Stop ends both;
on the memory broker and on SQS (moto)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from examples import fifo_components
from taskstream.brokers.base import Broker, broker_from_url
from taskstream.messages import Envelope
from taskstream.producer import Producer
from tests.support.names import unique
from tests.support.queues import delete_queues

SQS_ENDPOINT = os.environ.get("TASKSTREAM_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")


def check_table(db: Path, n: int) -> None:
    rows = fifo_components.read_table(db)
    ids = sorted(r[0] for r in rows)
    assert ids == [f"m{i:04d}" for i in range(n)]  # every message once (upserts absorb redeliveries)
    by_component: dict[str, list[int]] = {}
    for _id, seq, component, action, _result, _sent in rows:
        by_component.setdefault(component, []).append(seq)
        assert (action == "forward") == (component == "backend")
    # the front-end consumed the FIFO queue in order: its rows were written in message order
    assert by_component["frontend"] == sorted(by_component["frontend"])
    assert sorted(by_component["backend"]) == [i for i in range(n) if fifo_components.ACTIONS[i % 4] == "forward"]
    results = {r[1]: r[4] for r in rows}
    assert results[0] == "3" and results[1] == "3" and results[3] == "MSG 3"  # add, multiply, upper
    assert results[2] == str(sum(range(102)))  # forward: done by the back-end


async def run_s6(broker: Broker, tmp_path: Path, *, n: int, name: str) -> None:
    db = tmp_path / "s6.db"
    queue = f"{name}-in.fifo"
    await fifo_components.send(broker, queue, fifo_components.make_messages(n))
    p = fifo_components.build_pipeline(queue=queue, db=db, name=name)
    results = await asyncio.wait_for(p.run_distributed(broker), 120)
    assert [r.ended_by for r in results["backend"]] == ["end-of-stream", "end-of-stream"]  # the Stop ended both
    assert sum(r.received for r in results["backend"]) >= n // 4
    check_table(db, n)


async def test_fifo_components_on_memory(tmp_path: Path) -> None:
    async with broker_from_url("memory://") as broker:
        await run_s6(broker, tmp_path, n=40, name="s6mem")


async def test_fifo_components_bounded_by_count_and_idle_time(tmp_path: Path) -> None:
    db = tmp_path / "bounded.db"
    async with broker_from_url("memory://") as broker:
        await fifo_components.send(broker, "bounded-in.fifo", fifo_components.make_messages(12), stop=False)
        p = fifo_components.build_pipeline(
            queue="bounded-in.fifo", db=db, max_messages=8, idle_timeout=0.5, name="s6bounded"
        )
        results = await asyncio.wait_for(p.run_distributed(broker), 30)
        assert results["frontend"][0].received == 8
        assert await broker.depth("bounded-in.fifo") == 4  # the rest waits for the next run
        # a second run with only an idle bound takes the rest and ends when the queue stays empty
        p2 = fifo_components.build_pipeline(queue="bounded-in.fifo", db=db, idle_timeout=0.5, name="s6bounded")
        results = await asyncio.wait_for(p2.run_distributed(broker), 30)
        assert results["frontend"][0].received == 4
    assert sorted(r[1] for r in fifo_components.read_table(db)) == list(range(12))


@pytest.mark.sqs
@pytest.mark.slow
async def test_fifo_components_on_sqs(tmp_path: Path) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    prefix = f"{unique('ts')}-"
    url = f"sqs://us-east-1/?endpoint_url={SQS_ENDPOINT}&queue_prefix={prefix}&visibility_timeout=20&wait_time=1"
    try:
        broker = broker_from_url(url)
        async with asyncio.timeout(10):
            await broker.connect()
    except Exception as exc:
        pytest.fail(f"no SQS server at {SQS_ENDPOINT} ({exc}); start it: bash scripts/services/sqs.sh")
    try:
        await run_s6(broker, tmp_path, n=16, name="s6sqs")
    finally:
        await broker.close()
        plan = fifo_components.build_pipeline(queue="s6sqs-in.fifo", db=tmp_path / "s6.db", name="s6sqs").plan()
        queues = [q for stage in plan.stages.values() for q in stage.queues]
        await delete_queues(url, "s6sqs-in.fifo", *queues, plan.dead_letter_queue)


async def test_a_plain_client_can_feed_the_front_end(tmp_path: Path) -> None:
    """Raw JSON bodies from a foreign producer are read like envelopes."""
    db = tmp_path / "raw.db"
    async with broker_from_url("memory://") as broker:
        await broker.declare("raw-in.fifo", fifo=True)
        await broker.publish("raw-in.fifo", b'{"id": "m0000", "seq": 0, "action": "add", "a": 1, "b": 2}', key="g")
        await Producer(broker).send("raw-in.fifo", Envelope(kind="control", body={"control": "stop"}, key="g"))
        p = fifo_components.build_pipeline(queue="raw-in.fifo", db=db, name="s6raw")
        await asyncio.wait_for(p.run_distributed(broker), 30)
    assert [(r[1], r[4]) for r in fifo_components.read_table(db)] == [(0, "3")]
