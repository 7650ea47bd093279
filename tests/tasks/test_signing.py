"""Opt-in code shipping: signed source runs on workers that do not have the function; anything else is refused."""

from __future__ import annotations

import asyncio

import pytest

from taskstream.errors import ConfigurationError
from taskstream.messages import Envelope
from taskstream.tasks import TaskRefused
from taskstream.tasks.protocol import ShippedCode, function_source, sign_code, verify_code
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


def test_signatures_bind_name_and_source() -> None:
    name, source = function_source(shipped_square)
    assert source.startswith("def shipped_square(") and "@" not in source.splitlines()[0]
    sig = sign_code(b"k", "square", name, source)
    verify_code(b"k", "square", ShippedCode(name=name, source=source, sig=sig))
    with pytest.raises(TaskRefused):
        verify_code(b"k", "other-task", ShippedCode(name=name, source=source, sig=sig))
    with pytest.raises(TaskRefused):
        verify_code(b"k", "square", ShippedCode(name=name, source=source + "\nimport os", sig=sig))
