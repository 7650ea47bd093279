"""``taskstream queues`` and ``taskstream dlq`` as separate processes, against RabbitMQ and the ZeroMQ device."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.brokers.contract.backends import BackendSpec
from tests.observe.conftest import Orders, only_on
from tests.support.names import unique

ROOT = Path(__file__).resolve().parents[2]


def cli_url(spec: BackendSpec) -> str:
    """The URL a separate process uses to reach the test's broker."""
    if spec.name == "rabbitmq":
        from tests.brokers.contract.backends.rabbitmq import URL

        return URL
    from tests.brokers.contract.backends.zmq import device

    endpoint = device().device
    assert endpoint is not None
    return endpoint.endpoints[0].replace("tcp://", "zmq://")


async def taskstream(
    *args: str, url: str, code: int = 0, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> str:
    """Run ``taskstream ARGS --broker URL`` without blocking the loop (the app runs on it); its stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskstream.cli",
        *args,
        "--broker",
        url,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate(stdin)
    assert process.returncode == code, f"exit {process.returncode}: {err.decode()}"
    return out.decode()


def as_json(text: str) -> Any:
    return orjson.loads(text)


@only_on("rabbitmq", "zmq")
async def test_the_cli_lists_shows_replays_and_purges(orders: Orders, spec: BackendSpec) -> None:
    url = cli_url(spec)
    for number in (1, 13, 14):
        await orders.app.publish(orders.queue, {"n": number})
    await orders.wait_handled(1)
    await orders.wait_dlq_depth(2)

    listed = as_json(await taskstream("dlq", "list", orders.queue, "--json", url=url))
    assert len(listed) == 2 and all("KeyError" in row["reason"] and row["attempts"] == 2 for row in listed)
    assert {row["original_queue"] for row in listed} == {orders.queue}
    table = await taskstream("dlq", "list", orders.queue, url=url)
    assert "2 dead letter(s)" in table and listed[0]["message_id"] in table

    first = listed[0]["message_id"]
    shown = as_json(await taskstream("dlq", "show", orders.queue, first, "--json", url=url))
    assert shown["body_encoding"] == "json" and orjson.loads(shown["body"])["id"] == first
    assert shown["headers"]["x-original-queue"] == orders.queue
    text = await taskstream("dlq", "show", orders.queue, first, url=url)
    assert "x-death-reason: failed 2 times" in text
    await taskstream("dlq", "show", orders.queue, "no-such-id", url=url, code=2)

    dry = as_json(await taskstream("dlq", "replay", orders.queue, "--dry-run", "--json", url=url))
    assert dry["dry_run"] and len(dry["replayed"]) == 2
    await orders.wait_dlq_depth(2)
    assert orders.handled == [1]

    figures = as_json(await taskstream("queues", orders.queue, "--json", url=url))
    assert figures[0]["dead_letter_depth"] == 2 and figures[0]["depth"] == 0
    if spec.name == "zmq":  # the device reports in-flight messages and consumers per queue
        assert figures[0]["in_flight"] == 0 and figures[0]["consumers"] == 1

    orders.fixed = True
    replayed = as_json(await taskstream("dlq", "replay", orders.queue, "--id", first, "--json", url=url))
    assert [row["message_id"] for row in replayed["replayed"]] == [first] and replayed["kept"] == 1
    await orders.wait_dlq_depth(1)
    assert len(orders.handled) == 2

    await taskstream("dlq", "purge", orders.queue, url=url, code=1, stdin=b"n\n")  # asked, said no
    await orders.wait_dlq_depth(1)
    out = await taskstream("dlq", "purge", orders.queue, "--yes", url=url)
    assert "1 message(s) before" in out
    await orders.wait_dlq_depth(0)


@only_on("rabbitmq")
async def test_queues_of_an_app_module(orders: Orders, spec: BackendSpec) -> None:
    url = cli_url(spec)
    prefix = unique("observe-app")  # the app module's queue names, this run's own
    consumed, missing = f"{prefix}-orders", unique("missing-queue")
    await orders.inspect.declare(consumed)
    try:
        out = await taskstream(
            "queues", "--app", "tests.observe.cli_app:app", missing, url=url, env={"TS_OBSERVE_PREFIX": prefix}
        )
        assert consumed in out and f"{consumed}.dlq" in out
        assert f"{missing} does not exist" in out
    finally:
        for name in (consumed, f"{consumed}.dlq", f"{prefix}-tasks"):
            await orders.inspect.delete_queue(name)
