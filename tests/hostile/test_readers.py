"""Every reader of a queue, fed hostile bodies by a plain client of each broker, then valid ones.

Each hostile body must land in that reader's dead-letter queue with an ``x-death-reason`` saying what was wrong,
and every valid message behind them must be handled. Readers: the consumer runtime (``@app.consumer``), a task
worker, a stream stage replica, ``QueueSource``, a ``Service`` and a ``ServiceClient``'s reply queue. Every
reader runs on memory and RabbitMQ, the consumer on every broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from taskstream.app import App
from taskstream.intake import reply_dead_letter_queue
from taskstream.payloads import ClaimCheck
from taskstream.settings import Settings
from taskstream.stream_ops import MemoryStateStore, Pipeline, QueueSource
from taskstream.stream_ops.service import Service, ServiceClient, service_queue
from taskstream.stream_ops.wire import Stop
from tests.hostile.conftest import LIMIT, PATIENCE, VALID, Backend, Hostile, assert_reasons, common_bodies, envelope
from tests.support.waiting import wait_for

WRONG_TYPES = Hostile(
    "wrong-types", envelope(kind="record", id=5, headers=[1], body={"n": -1}), "broken taskstream envelope"
)


def _settings() -> Settings:
    return Settings(max_message_bytes=LIMIT, shutdown_grace=2.0, max_attempts=2, concurrency=4, prefetch=8)


def _valid(i: int) -> bytes:
    """Valid message ``i``: plain JSON, or every other one a taskstream record envelope."""
    if i % 2:
        return envelope(kind="record", id=uuid.uuid4().hex, created_at=time.time(), body={"n": i})
    return b'{"n": %d}' % i


async def _send_all(backend: Backend, queue: str, hostile: list[Hostile], valid: list[bytes]) -> None:
    for item in hostile:
        await backend.send(queue, item.body)
    for body in valid:
        await backend.send(queue, body)


# -- the readers -----------------------------------------------------------------------------------------------


async def consumer(backend: Backend) -> None:
    queue = backend.queue("consumer")
    seen: list[int] = []
    # limited by the App's max_message_bytes setting (TASKSTREAM_MAX_MESSAGE_BYTES), not the broker's
    app = App(
        broker=backend.reader_broker(limited=False), settings=_settings(), workers=False, result_store="memory://"
    )

    @app.consumer(queue)
    def handle(body: dict[str, int]) -> None:
        seen.append(body["n"])

    hostile = [
        *common_bodies(),
        WRONG_TYPES,
        Hostile("bad-created-at", envelope(kind="record", id="c1", created_at="yesterday", body={}), "created_at"),
    ]
    async with app:
        await _send_all(backend, queue, hostile, [_valid(i) for i in range(VALID)])
        found = await backend.dead_letters(app.broker.dead_letter_name(queue), hostile)
        await wait_for(
            lambda: len(seen) == VALID, what=f"{VALID} valid messages handled (got {sorted(seen)})", timeout=PATIENCE
        )
    assert sorted(seen) == list(range(VALID))
    assert_reasons(found, hostile, queue)


async def task_worker(backend: Backend) -> None:
    queue = backend.queue("tasks")
    calls: list[int] = []
    store = "memory://" if backend.name == "memory" else f"sqlite:///{backend.tmp_path / 'results.sqlite3'}"
    app = App(broker=backend.reader_broker(), settings=_settings(), workers=True, result_store=store)
    name = f"hostile_echo_{uuid.uuid4().hex[:6]}"

    @app.task(queue=queue, name=name)
    def echo(n: int) -> int:
        calls.append(n)
        return n

    def request(i: int) -> bytes:
        return envelope(kind="task", id=uuid.uuid4().hex, created_at=time.time(), body={"task": name, "args": [i]})

    hostile = [
        *common_bodies(),
        WRONG_TYPES,
        Hostile("not-a-request", envelope(kind="task", id="t1", body=[1, 2]), "malformed task request"),
        Hostile("task-not-a-name", envelope(kind="task", id="t2", body={"task": 5}), "malformed task request"),
        Hostile("raw-json", b'{"task": "looks like one"}', "not a task message"),
    ]
    async with app:
        await _send_all(backend, queue, hostile, [request(i) for i in range(VALID)])
        found = await backend.dead_letters(app.broker.dead_letter_name(queue), hostile)
        await wait_for(
            lambda: len(calls) == VALID, what=f"{VALID} valid tasks run (got {sorted(calls)})", timeout=PATIENCE
        )
    assert sorted(calls) == list(range(VALID))
    assert_reasons(found, hostile, queue)


async def stream_stage(backend: Backend) -> None:
    p = Pipeline(f"hostile-{uuid.uuid4().hex[:8]}")
    got = p.source("src", []).stage("work").collect()
    plan = p.plan()
    queue, dlq = plan.stages["work"].queue(0), plan.dead_letter_queue
    backend.queues.update({queue, dlq})
    broker = backend.reader_broker()
    await broker.connect()
    await broker.declare(queue)

    def record(**fields: Any) -> bytes:
        return envelope(kind="record", created_at=1.0, **fields)

    hostile = [
        *common_bodies(),
        Hostile("wrong-types", record(id=5, headers=[1], body=1), "wrong type"),
        Hostile("to-a-number", record(id="r1", headers={"to": 5}, body=1), "header 'to'"),
        Hostile("to-nowhere", record(id="r2", headers={"to": "nowhere"}, body=1), "not an entry"),
        Hostile("key-a-number", record(id="r3", key=7, body=1), "key must be a string"),
        Hostile(
            "eos-sent-not-a-number",
            envelope(kind="control", id="c1", body={"control": "eos", "from": "x/0", "sent": "many"}),
            "sent",
        ),
    ]
    run = asyncio.create_task(
        p.run_stage("work", broker=broker, store=MemoryStateStore(), claim_check=ClaimCheck.disabled())
    )
    await _send_all(backend, queue, hostile, [b'{"n": %d}' % i for i in range(VALID)])
    found = await backend.dead_letters(dlq, hostile)
    await wait_for(
        lambda: len(got) == VALID or run.done(), what=f"{VALID} valid records through the stage", timeout=PATIENCE
    )
    await backend.send(queue, Stop.message().body)  # only now: SQS does not keep the order of what was sent
    result = await asyncio.wait_for(run, PATIENCE)
    assert result.ended_by == "stop"
    assert sorted(item["n"] for item in got) == list(range(VALID))
    assert_reasons(found, hostile, queue)


async def queue_source(backend: Backend) -> None:
    queue = backend.queue("source")
    broker = backend.reader_broker()
    await broker.connect()
    await broker.declare(queue)
    p = Pipeline(f"hostile-{uuid.uuid4().hex[:8]}")
    got = p.source("q", QueueSource(queue, broker=broker)).collect()
    hostile = [
        *common_bodies(),
        Hostile("wrong-types", envelope(kind="record", id=5, headers=[1], body=1), "wrong type"),
        Hostile("key-a-number", envelope(kind="record", id="k1", key=7, body=1), "key must be a string"),
    ]
    run = asyncio.create_task(p.run(claim_check=ClaimCheck.disabled()))
    await _send_all(backend, queue, hostile, [_valid(i) for i in range(VALID)])
    found = await backend.dead_letters(broker.dead_letter_name(queue), hostile)
    await wait_for(
        lambda: len(got) == VALID or run.done(), what=f"{VALID} valid items from the source", timeout=PATIENCE
    )
    await backend.send(queue, b'{"control": "stop"}')  # only now: SQS does not keep the order of what was sent
    await asyncio.wait_for(run, PATIENCE)
    assert sorted(item["n"] for item in got) == list(range(VALID))
    assert_reasons(found, hostile, queue)


async def service(backend: Backend) -> None:
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    queue = service_queue(name)
    backend.queues.add(queue)
    seen: list[int] = []

    def handle(body: dict[str, int]) -> int:
        seen.append(body["n"])
        return body["n"]

    broker = backend.reader_broker()
    await broker.connect()
    answering = Service(name, handle, lock_path=False, claim_check=ClaimCheck.disabled())
    await answering.start(broker)
    hostile = [
        *common_bodies(),
        WRONG_TYPES,
        Hostile("reply-to-a-number", envelope(kind="task", id="s1", reply_to=7, body={"n": -1}), "reply_to"),
        Hostile("deadline-a-word", envelope(kind="task", id="s2", deadline="soon", body={"n": -1}), "deadline"),
    ]
    try:
        await _send_all(backend, queue, hostile, [_valid(i) for i in range(VALID)])
        found = await backend.dead_letters(broker.dead_letter_name(queue), hostile)
        await wait_for(
            lambda: len(seen) == VALID, what=f"{VALID} valid requests handled (got {sorted(seen)})", timeout=PATIENCE
        )
    finally:
        await answering.stop()
    assert sorted(seen) == list(range(VALID))
    assert_reasons(found, hostile, queue)


async def reply_queue(backend: Backend) -> None:
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    backend.queues.add(service_queue(name))
    broker = backend.reader_broker()
    await broker.connect()
    answering = Service(name, lambda body: body["n"] * 10, lock_path=False, claim_check=ClaimCheck.disabled())
    await answering.start(broker)
    client = ServiceClient(broker, claim_check=ClaimCheck.disabled())
    hostile = [
        *common_bodies(),
        WRONG_TYPES,
        Hostile("correlation-a-number", envelope(kind="result", id="r1", correlation_id=9, body={}), "correlation_id"),
    ]
    try:
        await client.start()
        queue = client.reply_queue
        backend.queues.add(queue)
        await _send_all(backend, queue, hostile, [])
        found = await backend.dead_letters(reply_dead_letter_queue(broker), hostile, original_queue=queue)
        replies = [await client.call(name, {"n": i}, timeout=PATIENCE) for i in range(VALID)]
    finally:
        await client.close()
        await answering.stop()
    assert replies == [10 * i for i in range(VALID)]
    assert_reasons(found, hostile, queue)


READERS: dict[str, Callable[[Backend], Awaitable[None]]] = {
    "consumer": consumer,
    "task_worker": task_worker,
    "stream_stage": stream_stage,
    "queue_source": queue_source,
    "service": service,
    "reply_queue": reply_queue,
}
#: every reader on every broker
CASES = [(reader, name) for reader in READERS for name in ("memory", "rabbitmq", "sqs", "azure", "zmq")]


@pytest.mark.parametrize(
    ("reader", "backend"),
    [pytest.param(r, b, id=f"{r}-{b}", marks=getattr(pytest.mark, b)) for r, b in CASES],
    indirect=["backend"],
)
async def test_hostile_bodies_are_dead_lettered_with_a_reason_and_valid_ones_behind_them_are_handled(
    reader: str, backend: Backend
) -> None:
    await READERS[reader](backend)
