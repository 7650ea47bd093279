"""Hostile bundles (``taskstream.bundles``), sent to a task worker by a plain client of each broker.

A bundle's broken messages are dead-lettered one by one, each with its own reason, its bundle's id and its
index; the valid messages beside them run once each; a bundle that is broken as a whole is dead-lettered whole;
valid tasks sent behind all of it are handled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from taskstream.app import App
from taskstream.settings import Settings
from tests.hostile.conftest import PATIENCE, Backend, envelope
from tests.support.waiting import wait_for

BACKENDS = ("memory", "rabbitmq", "sqs", "azure", "zmq")


def _task(name: str, i: int) -> dict[str, Any]:
    return {
        "ts": 1,
        "kind": "task",
        "id": uuid.uuid4().hex,
        "created_at": time.time(),
        "body": {"task": name, "args": [i]},
    }


@pytest.mark.parametrize(
    "backend", [pytest.param(b, id=b, marks=getattr(pytest.mark, b)) for b in BACKENDS], indirect=True
)
async def test_broken_parts_of_a_bundle_are_dead_lettered_alone_and_the_rest_run_once(backend: Backend) -> None:
    queue = backend.queue("bundles")
    calls: list[int] = []
    store = "memory://" if backend.name == "memory" else f"sqlite:///{backend.tmp_path / 'results.sqlite3'}"
    settings = Settings(shutdown_grace=2.0, max_attempts=2, concurrency=4, prefetch=8)
    app = App(broker=backend.reader_broker(limited=False), settings=settings, workers=True, result_store=store)
    name = f"bundled_echo_{uuid.uuid4().hex[:6]}"

    @app.task(queue=queue, name=name)
    def echo(n: int) -> int:
        calls.append(n)
        return n

    entries: list[Any] = [
        [{"ts_kind": "task"}, _task(name, 0)],
        [1, 2, 3],  # 1: not a pair
        [[1], _task(name, 99)],  # 2: headers not an object
        [{}, {"task": name}],  # 3: not an envelope
        [{}, {"ts": 1, "kind": "task", "id": 5, "created_at": "never"}],  # 4: broken envelope
        [{}, {"ts": 1, "kind": "bundle", "id": "inner", "body": [[{}, _task(name, 98)]]}],  # 5: nested bundle
        [{"ts_kind": "task"}, {"ts": 1, "kind": "task", "id": "t9", "body": [1, 2]}],  # 6: not a task request
        [{}, _task(name, 1)],
        [{}, _task(name, 2)],
    ]
    reasons = {
        1: "not a [headers, envelope] pair",
        2: "headers are not an object",
        3: "not a taskstream envelope",
        4: "broken taskstream envelope",
        5: "a bundle inside a bundle",
        6: "malformed task request",
    }
    bundle_id = uuid.uuid4().hex
    bundle = orjson.dumps({"ts": 1, "kind": "bundle", "id": bundle_id, "created_at": time.time(), "body": entries})
    whole = {
        envelope(kind="bundle", id="not-a-list", body={"a": 1}): "non-empty list",
        envelope(kind="bundle", id="empty", body=[]): "non-empty list",
    }
    async with app:
        await backend.send(queue, bundle)
        for body in whole:
            await backend.send(queue, body)
        for i in (3, 4):
            await backend.send(queue, orjson.dumps(_task(name, i)))
        dead = await _dead_letters(backend, app.broker.dead_letter_name(queue), len(reasons) + len(whole))
        await wait_for(lambda: len(calls) >= 5, what=f"5 valid tasks run (got {sorted(calls)})", timeout=PATIENCE)
        await asyncio.sleep(0.5)  # a part run twice would show now
    assert sorted(calls) == [0, 1, 2, 3, 4], "each valid task once; nothing from a broken or nested entry"
    parts = {d.headers.get("x-bundle-index"): d for d in dead if d.headers.get("x-bundle-id") == bundle_id}
    assert sorted(parts) == sorted(reasons), [d.headers for d in dead]
    for index, words in reasons.items():
        reason = str(parts[index].headers.get("x-death-reason", "")).lower()
        assert words in reason, (index, reason)
        assert parts[index].headers.get("x-original-queue") == queue
    wholes = [d for d in dead if d.headers.get("x-bundle-id") is None]
    assert sorted(d.body for d in wholes) == sorted(whole), "a broken bundle is dead-lettered whole, bytes kept"
    assert all("non-empty list" in str(d.headers.get("x-death-reason")) for d in wholes)


async def _dead_letters(backend: Backend, dlq: str, count: int) -> list[Any]:
    broker = await backend.inspector()
    await broker.declare(dlq)
    subscription = broker.consume(dlq, prefetch=64)
    found: list[Any] = []
    try:
        async with asyncio.timeout(PATIENCE):
            while len(found) < count:
                delivery = await subscription.__anext__()
                await delivery.ack()
                found.append(delivery)
    except TimeoutError:
        pytest.fail(
            f"{len(found)} of {count} dead letters on {dlq!r} within {PATIENCE} s: {[d.headers for d in found]}"
        )
    finally:
        await subscription.close()
    return found
