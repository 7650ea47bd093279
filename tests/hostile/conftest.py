"""How the hostile-input suite reaches each broker, what it sends, and how it reads the dead letters back.

Hostile bodies are sent by a plain client of each broker (aio-pika, aiobotocore, the Azure Storage Queues SDK;
``broker.publish(raw_bytes)`` on the memory broker and the ZeroMQ device, which have no other client). The
readers run on their own broker object with a small ``max_message_bytes`` (:data:`LIMIT`), so an oversized body
needs only a few KiB. Dead letters are read back through taskstream and matched to what was sent by their bytes
(a plain SQS or Azure client cannot choose the message id).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskstream.brokers.base import Broker, Delivery
from taskstream.brokers.memory import MemoryBroker
from tests.brokers.contract.backends import BackendSpec, all_specs

#: ``max_message_bytes`` of every reader in this suite
LIMIT = 16 * 1024
#: how long a test waits for dead letters and handled messages
PATIENCE = 30.0
#: valid messages sent behind the hostile ones
VALID = 5

SPECS = {spec.name: spec for spec in all_specs()}


@dataclass(frozen=True)
class Hostile:
    """One hostile body and the words its dead-letter reason must hold (lower case)."""

    name: str
    body: bytes
    reason: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def common_bodies() -> list[Hostile]:
    """The bodies every reader gets (its own wrong-typed envelopes are added per reader)."""
    deep = b'{"i": ' + b"[" * 900 + b"]" * 900 + b"}"
    eight_zero_bytes = _b64(b"\0" * 8).encode()
    return [
        Hostile("deep", deep, "nests deeper than"),
        Hostile("invalid-utf8", b'{"s": "\xff\xfe\xfd"}', "not valid json"),
        Hostile("huge-float", b'{"x": 1e400}', "not valid json"),
        Hostile("huge-int", b'{"x": ' + b"7" * 400 + b"}", "not valid json"),
        Hostile(
            "object-array",
            b'{"a": {"__ts__": "ndarray", "dtype": "|O", "shape": [1], "b64": "' + eight_zero_bytes + b'"}}',
            "dtype=object",
        ),
        Hostile("bad-base64", b'{"a": {"__ts__": "bytes", "b64": "!!not base64!!"}}', "broken 'bytes' value"),
        Hostile(
            "bad-shape",
            b'{"a": {"__ts__": "ndarray", "dtype": "<f8", "shape": [3, 3], "b64": "' + eight_zero_bytes + b'"}}',
            "broken 'ndarray' value",
        ),
        Hostile("unknown-tag", b'{"a": {"__ts__": "pickle", "b64": "gASVAAAAAAAAAAA="}}', "unknown encoded value"),
        Hostile("oversized", b'{"pad": "' + b"x" * (LIMIT + 4096) + b'"}', f"over the limit of {LIMIT} bytes"),
        Hostile("alien", b'{"ts": 1, "kind": "alien", "id": "alien-1", "body": {"n": -1}}', "kind"),
    ]


def envelope(**fields: Any) -> bytes:
    """A hand-written envelope document (fields as given, wrong types included)."""
    import orjson

    return orjson.dumps({"ts": 1, **fields})


def unique(stem: str) -> str:
    """A queue name no other test uses (SQS and Azure map the dot to a hyphen)."""
    return f"hostile.{stem}-{uuid.uuid4().hex[:8]}"


# -- brokers ---------------------------------------------------------------------------------------------------


class Backend:
    """One broker as the suite uses it: readers' brokers (small limit), a plain client, an inspecting broker.

    Args:
        name: the contract-suite backend name (``memory``, ``rabbitmq``, ``sqs``, ``azure``, ``zmq``).
        tmp_path: the test's scratch directory (result stores).
    """

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.spec: BackendSpec = SPECS[name]
        self.hub = f"hostile-{uuid.uuid4().hex[:8]}"
        self.made: list[Broker] = []
        self.queues: set[str] = set()
        self._plain: Any = None
        self._inspector: Broker | None = None

    # brokers

    def reader_broker(self, *, limited: bool = True) -> Broker:
        """An unconnected broker for a reader, its ``max_message_bytes`` :data:`LIMIT` (``limited=False``: the
        backend's default, for a reader limited by its App's ``max_message_bytes`` setting instead)."""
        broker: Broker
        if not limited:
            broker = MemoryBroker(self.hub) if self.name == "memory" else self.spec.make()
            self.made.append(broker)
            return broker
        if self.name == "memory":
            broker = MemoryBroker(self.hub, max_message_bytes=LIMIT)
        elif self.name == "rabbitmq":
            from taskstream.brokers.rabbitmq import RabbitMQBroker
            from tests.brokers.contract.backends.rabbitmq import URL

            broker = RabbitMQBroker.from_url(URL, max_message_bytes=LIMIT)
        elif self.name == "zmq":
            from taskstream.brokers.zeromq import ZeroMQBroker, ZeroMQConfig
            from tests.brokers.contract.backends.zmq import device

            endpoint = device().device
            assert endpoint is not None
            broker = ZeroMQBroker(endpoint.endpoints[0], ZeroMQConfig(max_message_bytes=LIMIT))
        elif self.name == "sqs":
            from taskstream.brokers.sqs import HEADER_ALLOWANCE

            broker = self.spec.make(max_message_bytes=LIMIT + HEADER_ALLOWANCE)  # the queue's size, headers too
        else:
            from taskstream.brokers.azure_queues import AzureQueueBroker

            broker = AzureQueueBroker.from_url(
                "azurequeue://", connection_string="UseDevelopmentStorage=true", max_message_bytes=LIMIT
            )
        assert broker.capabilities.max_message_bytes == LIMIT
        self.made.append(broker)
        return broker

    async def inspector(self) -> Broker:
        """A connected broker with the backend's default limits, for reading dead letters and cleaning up."""
        if self._inspector is None:
            broker = MemoryBroker(self.hub) if self.name == "memory" else self.spec.make()
            await broker.connect()
            self._inspector = broker
        return self._inspector

    def queue(self, stem: str) -> str:
        name = self.spec.queue_name(unique(stem))
        self.queues.add(name)
        return name

    # the plain client

    async def send(self, queue: str, body: bytes) -> None:
        """Put ``body`` on ``queue`` the way a plain client of this broker does."""
        if self.name in ("memory", "zmq"):
            if self._plain is None:
                self._plain = MemoryBroker(self.hub) if self.name == "memory" else self.spec.make()
                await self._plain.connect()
            await self._plain.publish(queue, body, message_id=uuid.uuid4().hex)
        elif self.name == "rabbitmq":
            await self._send_amqp(queue, body)
        elif self.name == "sqs":
            await self._send_sqs(queue, body)
        else:
            await self._send_azure(queue, body)

    async def _send_amqp(self, queue: str, body: bytes) -> None:
        import aio_pika

        from tests.brokers.contract.backends.rabbitmq import URL

        if self._plain is None:
            connection = await aio_pika.connect(URL)
            self._plain = (connection, await connection.channel())
        _, channel = self._plain
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=uuid.uuid4().hex, content_type="application/json"), routing_key=queue
        )

    async def _send_sqs(self, queue: str, body: bytes) -> None:
        import aiobotocore.session

        from tests.brokers.contract.backends.sqs import ENDPOINT

        if self._plain is None:
            stack = contextlib.AsyncExitStack()
            client = await stack.enter_async_context(
                aiobotocore.session.get_session().create_client("sqs", endpoint_url=ENDPOINT, region_name="us-east-1")
            )
            self._plain = (stack, client, {})
        _, client, urls = self._plain
        if queue not in urls:
            names = await self.inspector()
            urls[queue] = (await client.get_queue_url(QueueName=names.sqs_name(queue)))["QueueUrl"]  # type: ignore[attr-defined]
        try:
            await client.send_message(QueueUrl=urls[queue], MessageBody=body.decode("utf-8"))
        except UnicodeDecodeError:  # SQS carries text only: binary goes base64 with the documented attribute
            attribute = json.dumps({"id": uuid.uuid4().hex, "e": "b64"})
            await client.send_message(
                QueueUrl=urls[queue],
                MessageBody=_b64(body),
                MessageAttributes={"taskstream": {"DataType": "String", "StringValue": attribute}},
            )

    async def _send_azure(self, queue: str, body: bytes) -> None:
        from azure.storage.queue.aio import QueueClient

        from taskstream.brokers.azure_queues import native_queue_name

        async with QueueClient.from_connection_string(
            "UseDevelopmentStorage=true", queue_name=native_queue_name(queue)
        ) as client:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:  # Azure carries text only: binary goes in the documented frame
                text = json.dumps({"tsq": 1, "id": uuid.uuid4().hex, "b": _b64(body)}, separators=(",", ":"))
            await client.send_message(text)

    # dead letters

    async def dead_letters(
        self, dlq: str, sent: list[Hostile], *, original_queue: str | None = None, patience: float = PATIENCE
    ) -> dict[str, Delivery]:
        """Read ``dlq`` until each of ``sent`` is there (matched by its bytes); fails naming what is missing.

        Dead letters of other queues (``original_queue`` given: a shared dead-letter queue) go back untouched.
        """
        broker = await self.inspector()
        found: dict[str, Delivery] = {}
        await broker.declare(dlq)  # as the readers declare it (they may not have dead-lettered anything yet)
        subscription = broker.consume(dlq, prefetch=64)
        try:
            async with asyncio.timeout(patience):
                while len(found) < len(sent):
                    delivery = await subscription.__anext__()
                    if original_queue is not None and delivery.headers.get("x-original-queue") != original_queue:
                        await delivery.nack(requeue=True)
                        continue
                    await delivery.ack()
                    for hostile in sent:
                        if _same(hostile.body, delivery.body):
                            found[hostile.name] = delivery
                            break
                    else:
                        pytest.fail(f"unexpected dead letter {delivery.body[:80]!r}: {delivery.headers}")
        except TimeoutError:
            missing = sorted({h.name for h in sent} - set(found))
            pytest.fail(f"not dead-lettered to {dlq!r} within {patience} s: {missing}")
        finally:
            await subscription.close()
        return found

    async def close(self) -> None:
        for broker in self.made:
            with contextlib.suppress(Exception):
                await broker.close()
        if self._plain is not None:
            with contextlib.suppress(Exception):
                if self.name in ("memory", "zmq"):
                    await self._plain.close()
                elif self.name == "rabbitmq":
                    await self._plain[0].close()
                elif self.name == "sqs":
                    await self._plain[0].aclose()
        if self._inspector is not None:
            if self.name != "memory":
                for queue in self.queues:
                    for name in (queue, self._inspector.dead_letter_name(queue)):
                        with contextlib.suppress(Exception):
                            await self._inspector.delete_queue(name)
            with contextlib.suppress(Exception):
                await self._inspector.close()


def _same(sent: bytes, dead: bytes) -> bool:
    """A dead letter keeps the original bytes (a body too large even for the dead-letter queue, a prefix)."""
    return dead == sent or (len(dead) >= 1024 and sent.startswith(dead))


def assert_reasons(found: dict[str, Delivery], sent: list[Hostile], queue: str) -> None:
    """Each dead letter carries the reason schema, and its reason says what was wrong."""
    for hostile in sent:
        headers = found[hostile.name].headers
        reason = str(headers.get("x-death-reason", "")).lower()
        assert hostile.reason.lower() in reason, f"{hostile.name}: reason {reason!r} lacks {hostile.reason!r}"
        assert headers.get("x-original-queue") == queue, (hostile.name, headers)
        assert "x-attempts" in headers and "x-dead-lettered-at" in headers, (hostile.name, headers)


@pytest.fixture
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The backend named by the test's ``backend_name`` parameter, with its server checked and queues cleaned."""
    name: str = request.param
    spec = SPECS[name]
    if spec.setup is not None:
        await spec.setup()
    made = Backend(name, tmp_path)
    try:
        yield made
    finally:
        await made.close()
