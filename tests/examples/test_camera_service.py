"""Scenario S4: a single-owner camera behind a queue, 10 concurrent requesters, serialised access."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from examples import camera_service
from taskstream.brokers.base import broker_from_url
from taskstream.errors import BrokerConnectionError, ConfigurationError, QueueNotFound, TaskError
from taskstream.stream_ops import Pipeline
from taskstream.stream_ops.service import ServiceClient, service_queue
from tests.support.waiting import wait_for


async def test_ten_concurrent_requesters_get_distinct_frames_one_at_a_time(tmp_path: Path) -> None:
    service = camera_service.make_service(lock_path=tmp_path / "camera.lock")
    async with broker_from_url("memory://") as broker:
        await service.start(broker)
        try:
            log = await asyncio.wait_for(camera_service.run_clients(broker, clients=10, pictures=4), 60)
        finally:
            await service.stop()
    assert len(log.frames) == 40
    assert sorted(log.frames) == list(range(40))  # each frame taken once, for exactly one requester
    assert service.max_in_handler == 1  # the device was never driven by two requests at once
    assert service.handled == 40
    image = log.last_image
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (120, 160, 3)
    assert len(log.lines) == 40 and all("frame" in line for line in log.lines)


async def test_errors_quit_and_single_ownership(tmp_path: Path) -> None:
    lock = tmp_path / "camera.lock"
    service = camera_service.make_service(lock_path=lock)
    async with broker_from_url("memory://") as broker:
        await service.start(broker)
        second = camera_service.make_service(lock_path=lock)
        with pytest.raises(ConfigurationError, match="already owned"):
            await second.start(broker)
        async with ServiceClient(broker) as client:
            with pytest.raises(TaskError, match="unknown camera command") as info:
                await client.call("camera", {"command": "zoom"}, timeout=10)
            assert info.value.remote_type == "ValueError"
            status = await client.call("camera", {"command": "status"}, timeout=10)
            assert status == {"frames_taken": 0, "size": [160, 120]}
            reply = await client.call("camera", {"command": "quit"}, timeout=10)
            assert reply["quit"] is True
            await asyncio.wait_for(service.stopped.wait(), 10)
            with pytest.raises(TimeoutError):  # nobody answers any more
                await client.call("camera", {"command": "status"}, timeout=0.3)
        await service.stop()
        # ownership is released: another process (here: instance) may take the camera now
        third = camera_service.make_service(lock_path=lock)
        await third.start(broker)
        await third.stop()


async def test_a_pipeline_step_calls_the_service(tmp_path: Path) -> None:
    service = camera_service.make_service(lock_path=tmp_path / "camera.lock")
    async with broker_from_url("memory://") as broker:
        await service.start(broker)
        try:
            p = Pipeline("shots")
            shots = (
                p.source("triggers", [{"command": "take_picture", "requester": f"t{i}"} for i in range(5)])
                .request("camera", timeout=10)
                .map(lambda reply: (reply["requester"], reply["frame"], float(reply["image"].mean())))
                .collect()
            )
            await p.run(broker)
        finally:
            await service.stop()
    assert sorted(s[1] for s in shots) == [0, 1, 2, 3, 4]
    assert all(s[2] > 0 for s in shots)


async def test_pending_calls_fail_loudly_when_the_client_closes() -> None:
    async with broker_from_url("memory://") as broker:
        client = ServiceClient(broker)
        await client.start()
        call = asyncio.create_task(client.call("nobody", {"x": 1}, timeout=30))

        # The request is queued, so the call is waiting for its reply (not refused as a call on a closed client).
        async def queued() -> int:
            try:
                return await broker.depth(service_queue("nobody"))
            except QueueNotFound:  # not declared yet
                return 0

        await wait_for(queued, what="the request to be queued", timeout=10)
        await client.close()
        with pytest.raises(BrokerConnectionError, match="closed while waiting for a reply"):
            await call


async def test_example_main_saves_the_last_frame(tmp_path: Path) -> None:
    png = tmp_path / "frame.png"
    log = await camera_service.main(["--clients", "3", "--pictures", "2", "--png", str(png)])
    assert log is not None and len(log.frames) == 6
    assert png.exists() and png.stat().st_size > 1000
