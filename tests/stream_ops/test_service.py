"""Request/reply services: errors raised by a handler reach the caller with their type."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import TaskError
from taskstream.stream_ops.service import Service, ServiceClient


class CameraJammed(Exception):
    """An error type of the service's own (not a built-in one)."""


async def test_a_handler_error_of_a_builtin_type_is_caught_by_that_type_and_others_are_task_errors() -> None:
    def handle(request: dict[str, Any]) -> Any:
        if request["command"] == "jam":
            raise CameraJammed("shutter stuck")
        raise ValueError(f"unknown command {request['command']!r}")

    service = Service("strict", handle, lock_path=False)
    async with MemoryBroker(f"svc-{uuid.uuid4().hex[:6]}") as broker:
        await service.start(broker)
        try:
            async with ServiceClient(broker) as client:
                with pytest.raises(ValueError, match="unknown command 'zoom'") as info:
                    await client.call("strict", {"command": "zoom"}, timeout=10)
                with pytest.raises(TaskError, match="shutter stuck") as other:
                    await client.call("strict", {"command": "jam"}, timeout=10)
        finally:
            await service.stop()
    assert isinstance(info.value, TaskError) and info.value.remote_type == "ValueError"
    assert "raise ValueError" in info.value.remote_traceback
    assert other.value.remote_type == "CameraJammed" and not isinstance(other.value, ValueError)
