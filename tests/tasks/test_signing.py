"""Opt-in code shipping: signed source runs on workers that do not have the function; anything else is refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from taskstream.errors import ConfigurationError
from taskstream.messages import Envelope
from taskstream.tasks import TaskRefused
from taskstream.tasks.protocol import (
    SIGNATURE_LIFETIME,
    TaskRequest,
    canonical_request,
    function_source,
    sign_request,
    verify_request,
)
from tests.tasks.conftest import TaskEnv, quick_settings


def shipped_square(x: int) -> int:
    import math  # shipped functions bring their imports with them

    return int(math.pow(x, 2))


async def test_signed_code_runs_on_a_worker_that_lacks_the_function(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key="k-123"))
    worker.task(queue=queue, name="placeholder")(len)  # it serves the queue but has no square
    client = env.app(workers=False, settings=quick_settings(signing_key="k-123"))
    square = client.task(queue=queue, ship_code=True)(shipped_square)
    async with worker, client:
        assert await square.submit(12) == 144
        assert await square.submit(square.submit(2)) == 16


async def test_signed_code_runs_in_chunks_and_in_worker_processes(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key="k-123"))
    worker.task(queue=queue, name="placeholder")(len)
    client = env.app(workers=False, settings=quick_settings(signing_key="k-123"))
    square = client.task(queue=queue, ship_code=True)(shipped_square)
    in_processes = client.task(queue=queue, ship_code=True, cpu_bound=True, timeout=60)(shipped_square)
    async with worker, client:
        assert [await f for f in square.map(range(5), chunksize=2)] == [0, 1, 4, 9, 16]
        assert [await f for f in in_processes.map([3, 4])] == [9, 16]


async def test_a_wrong_key_or_no_key_is_refused(env: TaskEnv) -> None:
    queue_a, queue_b = env.queue(), env.queue()
    other_key = env.app(settings=quick_settings(signing_key="someone-else"))
    other_key.task(queue=queue_a, name="placeholder")(len)  # serves queue_a
    no_key = env.app()
    no_key.task(queue=queue_b, name="placeholder")(len)  # serves queue_b
    client = env.app(workers=False, settings=quick_settings(signing_key="k-123"))
    square = client.task(queue=queue_a, ship_code=True)(shipped_square)
    async with other_key, no_key, client:
        with pytest.raises(TaskRefused, match="signature does not match"):
            await square.submit(3)
        with pytest.raises(TaskRefused, match="no signing key"):
            await square.with_options(queue=queue_b).submit(3)


async def test_unsigned_code_is_dead_lettered_with_the_reason(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app(settings=quick_settings(signing_key="k-123"))
    worker.task(queue=queue, name="placeholder")(len)
    async with worker:
        _, source = function_source(shipped_square)
        body = {"task": "square", "args": [3], "code": {"name": "shipped_square", "source": source}}
        await worker.producer.send(queue, Envelope(kind="task", body=body))
        dlq = worker.broker.dead_letter_name(queue)
        sub = worker.broker.consume(dlq, prefetch=10)
        try:
            async with asyncio.timeout(20):
                delivery = await sub.__anext__()
            assert "refusing unsigned shipped code" in str(delivery.headers.get("x-death-reason"))
            await delivery.ack()
        finally:
            await sub.close()


def test_ship_code_needs_a_key_and_a_def() -> None:
    from taskstream import App

    with pytest.raises(ConfigurationError, match="TASKSTREAM_SIGNING_KEY"):
        App(settings=quick_settings()).task(ship_code=True)(shipped_square)
    with pytest.raises(ConfigurationError, match=r"not a def|not available"):
        function_source(lambda x: x)


def _signed(**changes: Any) -> tuple[dict[str, Any], float]:
    name, source = function_source(shipped_square)
    body: dict[str, Any] = {"task": "square", "args": [3], "kwargs": {"z": b"\x00"}, "retries": 1}
    body.update(code={"name": name, "source": source}, **changes)
    now = time.time()
    return sign_request(b"k", "id-1", "reply-1", body), now


def test_the_signature_binds_the_whole_request_and_expires() -> None:
    _, source = function_source(shipped_square)
    assert source.startswith("def shipped_square(") and "@" not in source.splitlines()[0]
    signed, now = _signed()
    assert now + SIGNATURE_LIFETIME - 5 <= signed["code"]["expires"] <= time.time() + SIGNATURE_LIFETIME
    request = TaskRequest.model_validate(signed)
    assert verify_request(b"k", "id-1", "reply-1", request).name == "shipped_square"
    with pytest.raises(TaskRefused, match="does not match"):
        verify_request(b"other-key", "id-1", "reply-1", request)
    with pytest.raises(TaskRefused, match="does not match"):
        verify_request(b"k", "id-2", "reply-1", request)
    with pytest.raises(TaskRefused, match="does not match"):
        verify_request(b"k", "id-1", "reply-2", request)
    with pytest.raises(TaskRefused, match="does not match"):
        verify_request(b"k", "id-1", None, request)
    changes: list[dict[str, Any]] = [
        {"task": "other-task"},
        {"args": [4]},
        {"kwargs": {"z": b"\x01"}},
        {"retries": 2},
        {"retry_delay": 9.0},
        {"timeout": 1.0},
        {"cpu_bound": True},
        {"items": [[[3], {}]]},
        {"code": {**signed["code"], "source": source + "\nimport os"}},
        {"code": {**signed["code"], "name": "other"}},
        {"code": {**signed["code"], "expires": signed["code"]["expires"] + 3600}},
    ]
    for change in changes:
        tampered = TaskRequest.model_validate({**signed, **change})
        with pytest.raises(TaskRefused, match="does not match"):
            verify_request(b"k", "id-1", "reply-1", tampered)
    with pytest.raises(TaskRefused, match="expired"):
        verify_request(b"k", "id-1", "reply-1", request, now=signed["code"]["expires"] + 1)


def test_the_canonical_form_is_sorted_json_under_a_v2_domain() -> None:
    signed, _ = _signed()
    request = TaskRequest.model_validate(signed)
    canonical = canonical_request("id-1", "reply-1", request)
    domain, _, doc = canonical.partition(b"\x00")
    assert domain == b"taskstream-code-v2"
    parsed = orjson.loads(doc)
    assert list(parsed) == sorted(parsed)
    assert parsed["id"] == "id-1" and parsed["reply_to"] == "reply-1" and parsed["args"] == [3]
    assert parsed["kwargs"] == {"z": {"__ts__": "bytes", "b64": "AA=="}}  # as it travels
    assert "sig" not in parsed["code"]


def test_a_signature_that_is_not_hex_or_has_no_expiry_is_refused_cleanly() -> None:
    signed, _ = _signed()
    for sig in ["é" * 64, "zz" * 32, signed["code"]["sig"].upper(), signed["code"]["sig"][:-1], "\x00" * 64]:
        request = TaskRequest.model_validate({**signed, "code": {**signed["code"], "sig": sig}})
        with pytest.raises(TaskRefused, match="not 64 lowercase hex"):
            verify_request(b"k", "id-1", "reply-1", request)
    request = TaskRequest.model_validate({**signed, "code": {**signed["code"], "expires": None}})
    with pytest.raises(TaskRefused, match="no expiry"):
        verify_request(b"k", "id-1", "reply-1", request)
