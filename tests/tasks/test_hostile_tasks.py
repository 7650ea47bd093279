"""Task messages from a hostile or broken peer: captured signatures, reused ids, broken replies, failing stores.

Every test talks to the worker (or the client's reply queue) through a plain broker client, as an attacker or a
broken peer would, and checks what the worker answers, what lands in the dead-letter queue and what the result
store keeps.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskstream.app import App
from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import TaskError
from taskstream.messages import Envelope, decode, encode
from taskstream.settings import Settings
from taskstream.tasks import TaskRefused
from taskstream.tasks.protocol import function_source, new_task_id
from taskstream.tasks.registry import MAX_RETRIES
from tests.support.waiting import wait_for
from tests.tasks import library
from tests.tasks.conftest import TaskEnv, quick_settings

KEY = "k-hostile"
SECRET_RESULT = "the secret result of client A"
CALLS: list[int] = []  # shipped code appends here (it runs in this process, on a worker thread)


def counted_failure(x: int) -> int:
    import tests.tasks.test_hostile_tasks as here

    here.CALLS.append(x)
    raise ValueError(f"always fails ({x})")


def shipped_double(x: int) -> int:
    return 2 * x


def secret(_: int) -> str:
    return SECRET_RESULT


async def _declared(app: App, queue: str) -> str:
    await app.broker.declare(queue)
    return queue


async def _task_queue(app: App, queue: str) -> str:
    """Declare ``queue`` as a task client does (with its dead-letter queue), so it can be read before a submit."""
    dead_letter = app.broker.dead_letter_name(queue)
    await app.broker.declare(dead_letter)
    await app.broker.declare(queue, dead_letter=dead_letter)
    return queue


async def _next(app: App, queue: str, timeout: float = 20.0) -> tuple[Envelope, dict[str, Any]]:
    """The next message on ``queue`` (acked), decoded, with its broker headers."""
    subscription = app.broker.consume(queue, prefetch=1)
    try:
        async with asyncio.timeout(timeout):
            delivery = await subscription.__anext__()
        await delivery.ack()
        return decode(delivery.body, message_id=delivery.message_id), dict(delivery.headers)
    finally:
        await subscription.close()


async def _dead_reason(app: App, queue: str) -> str:
    """The ``x-death-reason`` of the next dead letter of ``queue`` (its body may not even be JSON)."""
    subscription = app.broker.consume(app.broker.dead_letter_name(queue), prefetch=1)
    try:
        async with asyncio.timeout(20):
            delivery = await subscription.__anext__()
        await delivery.ack()
        return str(delivery.headers.get("x-death-reason"))
    finally:
        await subscription.close()


async def _send(app: App, queue: str, envelope: Envelope) -> None:
    await app.broker.publish(queue, encode(envelope), message_id=envelope.id)


async def _capture_shipped_call(env: TaskEnv, *args: Any) -> Envelope:
    """A signed shipped-code call as it travels, taken off a queue no worker serves."""
    parked = env.queue("parked")
    client = env.app(workers=False, settings=quick_settings(signing_key=KEY))
    double = client.task(queue=parked, ship_code=True)(shipped_double)
    async with client:
        await _task_queue(client, parked)
        double.submit(*args)
        envelope, _ = await _next(client, parked)
    assert envelope.kind == "task" and envelope.body["code"]["sig"]
    return envelope


async def test_a_captured_signature_does_not_replay_with_other_arguments_or_reply_queue(env: TaskEnv) -> None:
    captured = await _capture_shipped_call(env, 21)
    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key=KEY))
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        # Unchanged, to the queue it was signed for: it runs (the reply goes to the original client's queue).
        # Changed arguments, or the same call answered to another queue: refused.
        forged_args = captured.model_copy(update={"body": {**captured.body, "args": [1000]}, "reply_to": mine})
        await _send(worker, queue, forged_args)
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "failed" and "signature" in reply.body["error"]["message"]
        forged_reply_to = captured.model_copy(update={"reply_to": mine})
        await _send(worker, queue, forged_reply_to)
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "failed" and "signature" in reply.body["error"]["message"]
        assert "signature does not match" in await _dead_reason(worker, queue)


async def test_a_signature_over_the_code_alone_is_refused(env: TaskEnv) -> None:
    import hashlib
    import hmac

    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key=KEY))
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        name, source = function_source(shipped_double)
        old_style = b"taskstream-code-v1\x00" + b"double\x00" + name.encode() + b"\x00" + source.encode()
        sig = hmac.new(KEY.encode(), old_style, hashlib.sha256).hexdigest()
        body = {"task": "double", "args": [4], "code": {"name": name, "source": source, "sig": sig}}
        await _send(worker, queue, Envelope(kind="task", reply_to=mine, body=body))
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "failed"
        assert reply.body["error"]["type"].endswith("TaskRefused")


async def test_an_expired_signature_is_refused(env: TaskEnv) -> None:
    from taskstream.tasks.protocol import sign_request

    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key=KEY))
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        name, source = function_source(shipped_double)
        task_id = new_task_id()
        body = {"task": "double", "args": [4], "code": {"name": name, "source": source}}
        body = sign_request(KEY.encode(), task_id, mine, body, expires=1.0)
        await _send(worker, queue, Envelope(id=task_id, kind="task", reply_to=mine, body=body))
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "failed" and "expired" in reply.body["error"]["message"]
        # Signed properly and in time, the same call runs.
        task_id = new_task_id()
        body = sign_request(KEY.encode(), task_id, mine, {**body, "code": {"name": name, "source": source}})
        await _send(worker, queue, Envelope(id=task_id, kind="task", reply_to=mine, body=body))
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "success" and reply.body["result"] == 8


async def test_shipped_code_retries_are_capped(env: TaskEnv) -> None:
    from taskstream.tasks.protocol import sign_request

    CALLS.clear()
    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key=KEY))
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        name, source = function_source(counted_failure)
        task_id = new_task_id()
        body = {
            "task": "counted",
            "items": [[[7], {}]],
            "retries": 2**63 - 1,
            "code": {"name": name, "source": source},
        }
        body = sign_request(KEY.encode(), task_id, mine, body)
        await _send(worker, queue, Envelope(id=task_id, kind="task", reply_to=mine, body=body))
        reply, _ = await _next(worker, mine, timeout=60)
        assert reply.body["status"] == "success"
        (outcome,) = reply.body["result"]
        assert outcome["error"]["type"] == "ValueError"
        assert len(CALLS) == MAX_RETRIES + 1


@pytest.mark.parametrize("sig", ["zz" * 32, "é" * 64, "ab", "AB" * 32 + " "])
async def test_a_signature_that_is_not_hex_is_refused_not_retried(env: TaskEnv, sig: str) -> None:
    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key=KEY))
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        name, source = function_source(shipped_double)
        body = {"task": "double", "args": [4], "code": {"name": name, "source": source, "sig": sig, "expires": 4e9}}
        await _send(worker, queue, Envelope(kind="task", reply_to=mine, body=body))
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "failed" and reply.body["attempts"] <= 1
        assert reply.body["error"]["type"].endswith("TaskRefused")
        assert "signature" in reply.body["error"]["message"]
        assert "signature" in await _dead_reason(worker, queue)


def test_task_ids_are_random() -> None:
    ids = [new_task_id() for _ in range(200)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # No id tells anything about the next one: no shared prefix, no shared suffix.
    for a, b in itertools.pairwise(ids):
        assert a[:8] != b[:8] and a[-8:] != b[-8:]


async def test_a_reused_task_id_never_leaks_another_clients_result(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app()
    worker.task(queue=queue)(secret)
    worker.task(queue=queue)(library.add)
    client = env.app(workers=False)
    own = client.task(queue=queue)(secret)
    async with worker, client:
        fut = own.submit(1)
        assert await fut == SECRET_RESULT
        thief = await _declared(worker, env.queue("thief"))
        stolen = Envelope(id=fut.task_id, kind="task", reply_to=thief, body={"task": "secret", "args": [1]})
        await _send(worker, queue, stolen)
        reply, _ = await _next(worker, thief)
        assert reply.body["status"] == "failed" and SECRET_RESULT not in str(reply.body)
        assert reply.body["error"]["type"].endswith("TaskRefused")
        assert "result" not in reply.body
        # Another task's name under the same id: refused too, and the finished record stays as it was.
        await _send(worker, queue, stolen.model_copy(update={"body": {"task": "add", "args": [1, 2]}}))
        reply, _ = await _next(worker, thief)
        assert reply.body["status"] == "failed" and SECRET_RESULT not in str(reply.body)
        kept = client.get_task(fut.task_id)
        assert kept.status == "success" and kept.result == SECRET_RESULT
        assert kept.reply_to == client.tasks.client.reply_queue  # the store knows who submitted it


async def test_a_duplicate_delivery_to_the_same_reply_queue_gets_the_stored_outcome(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app()
    worker.task(queue=queue)(library.add)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        call = Envelope(id=new_task_id(), kind="task", reply_to=mine, body={"task": "add", "args": [2, 3]})
        await _send(worker, queue, call)
        first, _ = await _next(worker, mine)
        await _send(worker, queue, call)
        second, _ = await _next(worker, mine)
        assert first.body["status"] == second.body["status"] == "success"
        assert first.body["result"] == second.body["result"] == 5
        assert worker.get_task(call.id).attempts == 1  # it ran once


@pytest.mark.parametrize(
    "body",
    [{"task": ""}, {"task": "secret", "args": "not a list"}, {"task": "secret", "retries": -1}, [1, 2]],
    ids=["empty-name", "args-not-a-list", "negative-retries", "not-an-object"],
)
async def test_a_malformed_message_never_overwrites_a_finished_record(env: TaskEnv, body: Any) -> None:
    queue = env.queue()
    worker = env.app()
    worker.task(queue=queue)(secret)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        fut = worker.tasks.registry["secret"].submit(1)
        assert await fut == SECRET_RESULT
        await _send(worker, queue, Envelope(id=fut.task_id, kind="task", reply_to=mine, body=body))
        reply, _ = await _next(worker, mine)
        assert reply.body["status"] == "failed" and SECRET_RESULT not in str(reply.body)
        assert "malformed task request" in await _dead_reason(worker, queue)
        kept = worker.get_task(fut.task_id)
        assert kept.status == "success" and kept.result == SECRET_RESULT


async def test_a_refusal_the_store_cannot_record_still_reaches_the_client(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app(result_store=f"sqlite:///{env.tmp_path / 'worker-only.sqlite3'}")
    worker.task(queue=queue, name="placeholder")(len)
    client = env.app(workers=False)
    unknown = client.tasks.remote("no-such-task", queue=queue)
    async with worker, client:
        await worker.tasks.store.close()  # every write of the worker's store fails from now on
        with pytest.raises(TaskRefused, match="no task named 'no-such-task'"):
            async with asyncio.timeout(20):
                await unknown.submit(1)


def _reply(task_id: str, **fields: Any) -> Envelope:
    body = {"task_id": task_id, "status": "success", "result": 1, "attempts": 1, "worker": "w:1"}
    body.update(fields)
    return Envelope(kind="result", correlation_id=task_id, body=body)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"attempts": "many"}, "attempts"),
        ({"attempts": [1]}, "attempts"),
        ({"started_at": "soon"}, "started_at"),
        ({"finished_at": {"x": 1}}, "finished_at"),
        ({"worker": 42}, "worker"),
        ({"status": "exploded"}, "status"),
        ({"status": "failed", "error": "not an object"}, "error"),
    ],
    ids=["attempts-str", "attempts-list", "started_at", "finished_at", "worker", "status", "error"],
)
async def test_a_reply_with_broken_fields_settles_the_future_with_an_error(
    env: TaskEnv, fields: dict[str, Any], named: str
) -> None:
    parked = env.queue("parked")
    client = env.app(workers=False)
    remote = client.tasks.remote("anything", queue=parked)
    async with client:
        await _task_queue(client, parked)
        fut = remote.submit(1)
        await _next(client, parked)  # the call is on its way: no worker will answer it
        await _send(client, client.tasks.client.reply_queue, _reply(fut.task_id, **fields))
        with pytest.raises(TaskError, match=named):
            async with asyncio.timeout(20):
                await fut


async def test_a_reply_that_is_not_an_object_settles_the_future(env: TaskEnv) -> None:
    parked = env.queue("parked")
    client = env.app(workers=False)
    remote = client.tasks.remote("anything", queue=parked)
    async with client:
        await _task_queue(client, parked)
        fut = remote.submit(1)
        await _next(client, parked)
        reply = Envelope(kind="result", correlation_id=fut.task_id, body=["not", "an", "object"])
        await _send(client, client.tasks.client.reply_queue, reply)
        with pytest.raises(TaskError, match="malformed reply"):
            async with asyncio.timeout(20):
                await fut


async def test_a_task_that_is_dead_lettered_unread_fails_the_clients_future(tmp_path: Path) -> None:
    # The worker reads payloads from another store than the client wrote to (a misconfiguration): the
    # large call cannot be opened, the runtime dead-letters it, and the client learns why.
    hub = f"hostile-{uuid.uuid4().hex[:8]}"

    def settings(store: str) -> Settings:
        return quick_settings(payload_store_url=f"file://{tmp_path / store}")

    worker = App(broker=MemoryBroker(hub, max_message_bytes=16_384), settings=settings("worker"), workers=True)
    worker.task(queue="tq", name="size")(len)
    client = App(broker=MemoryBroker(hub, max_message_bytes=16_384), settings=settings("client"), workers=False)
    size = client.tasks.remote("size", queue="tq")
    async with worker, client:
        fut = size.submit("x" * 50_000)
        with pytest.raises(TaskRefused, match="dead-lettered: payload"):
            async with asyncio.timeout(20):
                await fut
        record = await wait_for(lambda: (r := client.get_task(fut.task_id)).status == "failed" and r)
        assert "payload" in record.error["message"]
        assert await size.submit("small") == 5  # the worker goes on


async def test_an_unreadable_message_with_task_headers_is_answered(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app()
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        mine = await _declared(worker, env.queue("reply"))
        task_id = new_task_id()
        headers = {"ts_kind": "task", "correlation_id": task_id, "reply_to": mine}
        await worker.broker.publish(queue, b'{"ts": 1, "kind": "task", "id": [', headers=headers, message_id=task_id)
        reply, _ = await _next(worker, mine)
        assert reply.correlation_id == task_id and reply.body["status"] == "failed"
        assert "dead-lettered: malformed message" in reply.body["error"]["message"]
        assert "malformed message" in await _dead_reason(worker, queue)
