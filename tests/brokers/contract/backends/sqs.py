"""The SQS backend in the contract suite, against moto's server (``scripts/services/sqs.sh``).

``TASKSTREAM_TEST_SQS_ENDPOINT`` points elsewhere (LocalStack, say); the default is moto on 127.0.0.1:9324.
Dummy credentials and region ``us-east-1`` are set unless the environment already has them.
"""

from __future__ import annotations

import os
import urllib.request
import uuid

import pytest

from taskstream.brokers.base import Broker
from taskstream.brokers.sqs import SQSBroker, SQSOptions
from tests.brokers.contract.backends import BackendSpec

ENDPOINT = os.environ.get("TASKSTREAM_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")
PREFIX = f"ts{uuid.uuid4().hex[:6]}-"

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def make(visibility_timeout: float | None = None, **options: object) -> Broker:
    return SQSBroker(
        SQSOptions(
            region="us-east-1",
            endpoint_url=ENDPOINT,
            queue_prefix=PREFIX,
            visibility_timeout=visibility_timeout or 30.0,
            **options,  # type: ignore[arg-type]
        )
    )


async def setup() -> None:
    try:
        urllib.request.urlopen(ENDPOINT, timeout=3).close()
    except OSError as exc:
        if getattr(exc, "code", None):  # an HTTP error status: something answers
            return
        pytest.fail(f"no SQS API server at {ENDPOINT} ({exc}); start it with: bash scripts/services/sqs.sh")


SPEC = BackendSpec(name="sqs", make=make, setup=setup)
