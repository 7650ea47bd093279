"""RabbitMQ on 127.0.0.1:5672 (guest/guest) in the contract suite.

``TASKSTREAM_TEST_AMQP_URL`` points the suite at another server. The size limit is lowered to 1 MiB so the
size test runs cheaply; everything else uses the backend's defaults.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from taskstream.brokers.base import Broker
from taskstream.brokers.rabbitmq import RabbitMQBroker
from tests.brokers.contract.backends import BackendSpec

URL = os.environ.get("TASKSTREAM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def make(visibility_timeout: float | None = None) -> Broker:
    # RabbitMQ holds unacked messages until ack or disconnect: there is no visibility timeout to set.
    return RabbitMQBroker.from_url(URL, max_message_bytes=1024 * 1024)


def url(visibility_timeout: float | None = None) -> str:
    """The server's URL, for another process (no visibility timeout to pass)."""
    return URL


async def setup() -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(URL)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 5672), 5)
    except (OSError, TimeoutError) as exc:
        pytest.fail(
            f"RabbitMQ is not reachable at {parts.hostname}:{parts.port or 5672} ({exc}); "
            "start it with scripts/services/rabbitmq.sh"
        )
    writer.close()


SPEC = BackendSpec(name="rabbitmq", make=make, setup=setup, url=url)
