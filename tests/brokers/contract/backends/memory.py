"""The memory broker in the contract suite."""

from __future__ import annotations

import uuid

from taskstream.brokers.base import Broker
from taskstream.brokers.memory import MemoryBroker
from tests.brokers.contract.backends import BackendSpec

_HUB = f"contract-{uuid.uuid4().hex[:8]}"


def make(visibility_timeout: float | None = None) -> Broker:
    return MemoryBroker(_HUB, visibility_timeout=visibility_timeout or 30.0, max_message_bytes=1024 * 1024)


SPEC = BackendSpec(name="memory", make=make)
