"""The SQS backend in the contract suite, against moto's server (``scripts/services/sqs.sh``).

``TASKSTREAM_TEST_SQS_ENDPOINT`` points elsewhere (LocalStack, say); the default is moto on 127.0.0.1:9324.
Dummy credentials and region ``us-east-1`` are set unless the environment already has them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from taskstream.brokers.base import Broker
from taskstream.brokers.sqs import SQSBroker, SQSOptions
from tests.brokers.contract.backends import BackendSpec

ENDPOINT = os.environ.get("TASKSTREAM_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")
PREFIX = f"ts{uuid.uuid4().hex[:6]}-"

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def make(visibility_timeout: float | None = None, **options: Any) -> Broker:
    """An unconnected broker on the test server; ``options`` are :class:`SQSOptions` fields."""
    settings: dict[str, Any] = {"region": "us-east-1", "endpoint_url": ENDPOINT, "queue_prefix": PREFIX, "wait_time": 2}
    settings.update(options)
    return SQSBroker(SQSOptions(visibility_timeout=visibility_timeout or 30.0, **settings))


def url(visibility_timeout: float | None = None) -> str:
    """What :func:`make` builds, as a URL for another process (same server, region and queue prefix)."""
    endpoint = quote(ENDPOINT, safe="")
    return (
        f"sqs://us-east-1/?endpoint_url={endpoint}&queue_prefix={PREFIX}&wait_time=2"
        f"&visibility_timeout={visibility_timeout or 30.0}"
    )


async def setup() -> None:
    parts = urlsplit(ENDPOINT)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=3)
    except (OSError, TimeoutError) as exc:
        pytest.fail(f"no SQS API server at {ENDPOINT} ({exc}); start it with: bash scripts/services/sqs.sh")
    writer.close()
    await writer.wait_closed()


SPEC = BackendSpec(name="sqs", make=make, setup=setup, url=url)
